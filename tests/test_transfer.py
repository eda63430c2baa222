"""Transfer: aligners map channels only (identity for equal channels); `match_size` resizes maps to the current
batch's target and refuses token features of different lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hkt_hf.transfer import Aligner, build_aligner, feature_channels, feature_kind, match_size


def test_equal_channels_give_identity_whatever_the_length_or_size():
    for src, dst in [((8,), (8,)), ((5, 8), (5, 8)), ((8, 4, 4), (8, 4, 4)), ((10, 8), (5, 8)), ((8, 4, 4), (8, 2, 2))]:
        assert isinstance(build_aligner(src, dst), nn.Identity)


def test_vector_channel_change_is_a_linear():
    aligner = build_aligner((6,), (4,))
    assert isinstance(aligner, Aligner) and isinstance(aligner.proj, nn.Linear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(aligner(x), F.linear(x, aligner.proj.weight, aligner.proj.bias))


def test_token_aligner_maps_the_hidden_size_of_any_length():
    """Built on a batch of 10 tokens, it serves batches of any length: nothing depends on the first batch."""
    aligner = build_aligner((10, 6), (10, 4))
    assert isinstance(aligner.proj, nn.Linear)
    for length in (10, 3, 17):
        x = torch.randn(2, length, 6)
        torch.testing.assert_close(aligner(x), aligner.proj(x))


def test_token_features_of_different_lengths_are_a_clear_error():
    with pytest.raises(ValueError, match=r"carrier 'a=b'.*7 and 5 positions.*HKT needs token-aligned inputs"):
        match_size(torch.randn(2, 7, 4), torch.randn(2, 5, 4), "carrier 'a=b'")
    same = torch.randn(2, 5, 8)
    assert match_size(same, torch.randn(2, 5, 4)) is same  # channels may differ; lengths agree


def test_map_channel_change_is_a_1x1_conv():
    aligner = build_aligner((8, 4, 4), (3, 4, 4))
    assert isinstance(aligner.proj, nn.Conv2d) and aligner.proj.kernel_size == (1, 1)
    x = torch.randn(2, 8, 4, 4)
    expected = torch.einsum("oc,bchw->bohw", aligner.proj.weight[:, :, 0, 0], x) + aligner.proj.bias[:, None, None]
    torch.testing.assert_close(aligner(x), expected)


def test_maps_are_resized_to_the_current_target_size():
    """Pooling to shrink and interpolation to grow, to whatever size the target has in this batch."""
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(match_size(x, torch.randn(2, 3, 4, 4)), F.avg_pool2d(x, 2))
    assert match_size(torch.randn(2, 4, 4, 4), torch.randn(2, 2, 8, 8)).shape == (2, 4, 8, 8)
    assert match_size(x, torch.randn(1, 1, 6, 5)).shape == (2, 4, 6, 5)  # a later batch of another size
    assert match_size(x, torch.randn(2, 9, 8, 8)) is x


def test_gradients_reach_aligner_parameters():
    aligner = build_aligner((6, 4, 4), (3, 2, 2))
    match_size(aligner(torch.randn(2, 6, 4, 4)), torch.randn(2, 3, 2, 2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())


def test_kind_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Cannot align carrier 'x': a vector \[C\] feature of shape \(8,\) with a "
                                         r"map \[C, H, W\] feature"):
        build_aligner((8,), (8, 2, 2), "carrier 'x'")


def test_unsupported_rank_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unsupported carrier feature of per-sample shape \(1, 2, 3, 4\)"):
        feature_kind((1, 2, 3, 4))
    with pytest.raises(ValueError, match="Unsupported carrier feature"):
        build_aligner((1, 2, 3, 4), (1, 2, 3, 5))


def test_gate_channels_per_kind():
    assert feature_channels((7,)) == 7
    assert feature_channels((5, 9)) == 9
    assert feature_channels((3, 4, 4)) == 3
