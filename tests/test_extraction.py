"""FeatureExtractor and resolve_module: capture, replacement, truncated autograd, hooks that never outlive a block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hkt_hf.extraction import FeatureExtractor, FeatureSpec, resolve_module
from helpers import hooked_modules


class TupleBlock(nn.Module):
    """Returns a (feature, extra) tuple, like transformers' layers."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.sum(-1)


class Net(nn.Module):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.stem = nn.Linear(dim, dim)
        self.block = TupleBlock(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.block(torch.relu(self.stem(x)))
        return self.head(h)


@pytest.fixture()
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


def test_spec_parse_output_and_input():
    assert FeatureSpec.parse(" a.b ") == FeatureSpec("a.b", "output")
    assert FeatureSpec.parse("classifier:input") == FeatureSpec("classifier", "input")
    assert str(FeatureSpec("classifier", "input")) == "classifier:input"


def test_captures_outputs_inputs_and_first_tuple_element(net, x):
    specs = [FeatureSpec("stem"), FeatureSpec("head", "input"), FeatureSpec("block")]
    with FeatureExtractor(net, specs) as ext:
        net(x)
    stem = net.stem(x)
    torch.testing.assert_close(ext.features[0], stem)
    block_out = net.block.linear(torch.relu(stem))
    torch.testing.assert_close(ext.features[1], block_out)
    torch.testing.assert_close(ext.features[2], block_out)  # first element of the (feature, extra) tuple


def test_replacement_changes_the_forward_for_outputs_inputs_and_tuples(net, x):
    zeros = lambda i, f: torch.zeros_like(f)  # noqa: E731
    with FeatureExtractor(net, [FeatureSpec("head", "input")], zeros):
        out = net(x)
    torch.testing.assert_close(out, net.head.bias.expand(3, 2))
    with FeatureExtractor(net, [FeatureSpec("block")], lambda i, f: 2 * f):
        doubled = net(x)
    h = net.block.linear(torch.relu(net.stem(x)))
    torch.testing.assert_close(doubled, net.head(2 * h))
    # The captured feature is the original one, not the replacement.
    with FeatureExtractor(net, [FeatureSpec("stem")], lambda i, f: f + 1) as ext:
        net(x)
    torch.testing.assert_close(ext.features[0], net.stem(x))


def test_grad_after_replace_records_only_downstream(net, x):
    replaced = {}

    def replace(i: int, feature: torch.Tensor) -> torch.Tensor:
        assert not feature.requires_grad  # upstream ran under no_grad
        replaced[i] = torch.ones_like(feature, requires_grad=True)
        return replaced[i]

    with torch.no_grad(), FeatureExtractor(net, [FeatureSpec("block")], replace, grad_after_replace=True):
        out = net(x)
    assert out.requires_grad
    out.sum().backward()
    assert net.stem.weight.grad is None and net.block.linear.weight.grad is None  # upstream: no graph
    assert net.head.weight.grad is not None and replaced[0].grad is not None  # downstream: graph
    torch.testing.assert_close(replaced[0].grad, net.head.weight.sum(0).expand(3, 4))


def test_grad_mode_restored_after_block(net, x):
    with torch.no_grad():
        with FeatureExtractor(net, [FeatureSpec("stem")], lambda i, f: f, grad_after_replace=True):
            net(x)
            assert torch.is_grad_enabled()
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_hooks_removed_after_block_and_after_exception(net, x):
    specs = [FeatureSpec("stem"), FeatureSpec("head", "input")]
    with FeatureExtractor(net, specs):
        assert sorted(hooked_modules(net)) == ["head", "stem"]
        net(x)
    assert hooked_modules(net) == []

    def boom(i: int, feature: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("replacement failed")

    with pytest.raises(RuntimeError, match="replacement failed"), torch.no_grad():
        with FeatureExtractor(net, specs, boom, grad_after_replace=True):
            net(x)
    assert hooked_modules(net) == []
    assert torch.is_grad_enabled()


def test_resolve_module_error_lists_close_names(net):
    assert resolve_module(net, "block.linear") is net.block.linear
    assert resolve_module(net, "") is net
    with pytest.raises(ValueError, match=r"child \(Net\) has no module named 'block.linaer'.*block\.linear"):
        resolve_module(net, "block.linaer", role="child")
    with pytest.raises(ValueError, match="Top-level modules: stem, block, head"):
        resolve_module(net, "zzzzzz")
    with pytest.raises(ValueError, match="no module named 'stme'"):
        FeatureExtractor(net, [FeatureSpec("stme")])
