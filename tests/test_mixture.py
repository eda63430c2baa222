"""Mixture gates against hand-written formulas: genetic (reference), agreement, static and learned."""

from __future__ import annotations

import math

import pytest
import torch

from hkt_hf.mixture import AgreementGate, ConstantGate, GeneticGate, LearnedGate, StaticGate, build_gate


def qp(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def reference_mix(q: torch.Tensor, p: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's formula on [B, C]: a = sigmoid(<q,p>/sqrt(C)), GA = a p + (1-a) q, m = q + lam (p - GA)."""
    a = torch.sigmoid((q * p).sum(1, keepdim=True) / math.sqrt(q.shape[1]))
    ga = a * p + (1 - a) * q
    return q + lam * (p - ga), a.squeeze(1)


def test_genetic_gate_matches_reference_formula():
    q, p = qp(5, 16)
    out = GeneticGate(0.6)(q, p)
    m, a = reference_mix(q, p, 0.6)
    torch.testing.assert_close(out.mixed, m)
    torch.testing.assert_close(out.gate, a)
    torch.testing.assert_close(out.weight, 0.6 * (1 - a))
    assert out.gate.shape == (5,)


def test_genetic_gate_per_spatial_position_for_maps():
    q, p = qp(2, 6, 3, 4)
    out = GeneticGate(0.6)(q, p)
    assert out.gate.shape == (2, 3, 4) and out.mixed.shape == q.shape
    for h in range(3):
        for w in range(4):
            m, a = reference_mix(q[:, :, h, w], p[:, :, h, w], 0.6)
            torch.testing.assert_close(out.mixed[:, :, h, w], m)
            torch.testing.assert_close(out.gate[:, h, w], a)


def test_genetic_gate_per_token():
    q, p = qp(2, 5, 8)
    out = GeneticGate(0.3)(q, p)
    assert out.gate.shape == (2, 5)
    for t in range(5):
        m, a = reference_mix(q[:, t], p[:, t], 0.3)
        torch.testing.assert_close(out.mixed[:, t], m)
        torch.testing.assert_close(out.gate[:, t], a)


def test_agreement_gate_grows_with_agreement():
    q, p = qp(4, 8)
    out = AgreementGate(0.6)(q, p)
    a = torch.sigmoid((q * p).sum(1) / math.sqrt(8))
    torch.testing.assert_close(out.weight, 0.6 * a)
    torch.testing.assert_close(out.mixed, q + (0.6 * a)[:, None] * (p - q))


def test_static_gate_is_fixed_convex_combination():
    q, p = qp(3, 2, 4, 4)
    out = StaticGate(0.6)(q, p)
    torch.testing.assert_close(out.mixed, 0.7 * p + 0.3 * q)
    torch.testing.assert_close(out.weight, torch.full((3, 4, 4), 0.7))


@pytest.mark.parametrize("lam", [0.0, 0.27, 1.0])
def test_constant_gate_mixes_lambda_everywhere(lam):
    q, p = qp(3, 5, 8)
    out = ConstantGate(lam)(q, p)
    torch.testing.assert_close(out.mixed, (1 - lam) * q + lam * p)
    torch.testing.assert_close(out.weight, torch.full((3, 5), lam))
    torch.testing.assert_close(out.gate, torch.full((3, 5), lam))
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    masked = ConstantGate(lam)(q, p, mask)
    torch.testing.assert_close(masked.mixed[:, 2:], q[:, 2:])  # padding keeps the child's feature


def test_learned_gate_starts_equal_to_genetic_and_trains():
    q, p = qp(4, 8)
    learned, genetic = LearnedGate(8, 0.6)(q, p), GeneticGate(0.6)(q, p)
    torch.testing.assert_close(learned.mixed, genetic.mixed)
    torch.testing.assert_close(learned.weight, genetic.weight)
    gate = LearnedGate(8, 0.6)
    gate(q, p).mixed.square().sum().backward()
    assert {n for n, prm in gate.named_parameters() if prm.grad is not None and prm.grad.abs().sum() > 0} == {
        "query.weight", "key.weight", "lam_logit"
    }


@pytest.mark.parametrize("name", ["genetic", "agreement", "constant", "learned"])
@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_mixing_weight_lies_in_zero_lambda(name, lam):
    q, p = qp(64, 8, seed=3)
    q = q * 10  # wide range of agreements, gate values near 0 and 1
    out = build_gate(name, 8, lam)(q, p)
    # The learned lambda is sigmoid(theta), initialised from lambda clamped to [1e-4, 1 - 1e-4].
    assert out.weight.min() >= 0 and out.weight.max() <= lam + (1e-4 if name == "learned" else 1e-6)
    torch.testing.assert_close(out.mixed, q + out.weight[:, None] * (p - q))


def test_gate_computes_in_float32_for_half_inputs():
    q, p = qp(2, 8)
    out = GeneticGate(0.6)(q.bfloat16(), p.bfloat16())
    assert out.mixed.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match=r"lambda must lie in \[0, 1\], got 1.5"):
        GeneticGate(1.5)
    with pytest.raises(ValueError, match="Unknown gate 'foo'. Choose one of: genetic, agreement, constant, static, learned"):
        build_gate("foo", 4, 0.6)
    with pytest.raises(ValueError, match=r"Gate inputs differ in shape: child \(2, 4\), parent \(2, 5\)"):
        GeneticGate()(torch.zeros(2, 4), torch.zeros(2, 5))
