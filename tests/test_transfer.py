"""Transfer aligners: identity for equal shapes, projection plus resizing for vectors, tokens and maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hkt_hf.adapter import channels
from hkt_hf.transfer import Aligner, build_aligner, feature_kind


def test_equal_shapes_give_identity():
    for shape in [(8,), (5, 8), (8, 4, 4)]:
        assert isinstance(build_aligner(shape, shape), nn.Identity)


def test_vector_channel_change_is_a_linear():
    aligner = build_aligner((6,), (4,))
    assert isinstance(aligner, Aligner) and isinstance(aligner.proj, nn.Linear)
    x = torch.randn(3, 6)
    torch.testing.assert_close(aligner(x), F.linear(x, aligner.proj.weight, aligner.proj.bias))


def test_token_hidden_and_count_change():
    aligner = build_aligner((10, 6), (5, 4))
    assert isinstance(aligner.proj, nn.Linear)
    x = torch.randn(2, 10, 6)
    y = aligner(x)
    assert y.shape == (2, 5, 4)
    projected = aligner.proj(x)
    expected = F.interpolate(projected.transpose(1, 2), size=5, mode="linear").transpose(1, 2)
    torch.testing.assert_close(y, expected)
    # Same hidden size, different token count: no projection, only resizing.
    resize_only = build_aligner((10, 4), (5, 4))
    assert isinstance(resize_only.proj, nn.Identity)
    assert resize_only(torch.randn(2, 10, 4)).shape == (2, 5, 4)


def test_map_channel_change_is_a_1x1_conv():
    aligner = build_aligner((8, 4, 4), (3, 4, 4))
    assert isinstance(aligner.proj, nn.Conv2d) and aligner.proj.kernel_size == (1, 1)
    x = torch.randn(2, 8, 4, 4)
    expected = torch.einsum("oc,bchw->bohw", aligner.proj.weight[:, :, 0, 0], x) + aligner.proj.bias[:, None, None]
    torch.testing.assert_close(aligner(x), expected)


def test_map_downsizing_pools_and_upsizing_interpolates():
    down = build_aligner((4, 8, 8), (4, 4, 4))
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    up = build_aligner((4, 4, 4), (2, 8, 8))
    y = up(torch.randn(2, 4, 4, 4))
    assert y.shape == (2, 2, 8, 8)


def test_gradients_reach_aligner_parameters():
    aligner = build_aligner((6, 4, 4), (3, 2, 2))
    aligner(torch.randn(2, 6, 4, 4)).square().sum().backward()
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
    assert channels((7,)) == 7
    assert channels((5, 9)) == 9
    assert channels((3, 4, 4)) == 3
