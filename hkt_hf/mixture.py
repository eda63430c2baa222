"""Mixture (the M of ETM): Genetic Attention gates that mix the transferred parent feature p into the child's q.

Every gate returns m = q + w * (p - q) with a mixing weight w in [0, 1], computed in float32:

- `genetic` (reference): a = sigmoid(<q, p> / sqrt(C)), w = lambda * (1 - a): more parent where they disagree.
- `agreement`: w = lambda * a, a gate that grows with agreement (the authors' later description).
- `constant`: w = lambda everywhere (m = (1 - lambda) q + lambda p): the gate's ablation, the same share of the
  parent without its dependence on q and p (set lambda to a genetic run's logged mean mixing weight).
- `static`: w = 0.7 (m = 0.7 p + 0.3 q), from an unused function of the reference code; lambda is ignored.
- `learned`: like `genetic` with trainable query/key projections (initialised to identity) and a trainable lambda.

The gate is computed over channels: once per sample for vectors [B, C], per token for [B, N, D] and per spatial
position for maps [B, C, H, W]. A `mask` of real positions (e.g. a batch's `attention_mask` for tokens) keeps padding
out of the mixing (w = 0 there, so m = q) and out of the gate statistics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

STATIC_PARENT_WEIGHT = 0.7


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is true (all positions without a mask), in float32."""
    values = values.float()
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


class GateOutput(NamedTuple):
    mixed: torch.Tensor  # m, float32, same layout as q
    gate: torch.Tensor  # a, one value per sample / token / position
    weight: torch.Tensor  # w, the effective weight of the parent in m (0 at masked-out positions)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1) if x.ndim == 4 else x


def _channels_first(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.movedim(-1, 1) if ndim == 4 else x


class Gate(nn.Module):
    """Base class: subclasses give the agreement logits and the mixing weight from the gate value."""

    def __init__(self, lam: float = 0.6):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must lie in [0, 1], got {lam}.")
        self.lam = lam

    def logits(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return (q * p).sum(-1) / math.sqrt(q.shape[-1])

    def mixing_weight(self, a: torch.Tensor) -> torch.Tensor:
        return self.lam * (1.0 - a)

    def forward(self, q: torch.Tensor, p: torch.Tensor, mask: torch.Tensor | None = None) -> GateOutput:
        """m from q and p; `mask` (shape of the gate, e.g. [B, N] for tokens) marks the real positions."""
        if q.shape != p.shape:
            raise ValueError(f"Gate inputs differ in shape: child {tuple(q.shape)}, parent {tuple(p.shape)}.")
        with torch.autocast(q.device.type, enabled=False):  # gates stay in fp32 under mixed precision
            ql, pl = _channels_last(q.float()), _channels_last(p.float())
            a = torch.sigmoid(self.logits(ql, pl))
            w = self.mixing_weight(a)
            if mask is not None:
                if mask.shape != a.shape:
                    raise ValueError(f"Gate mask of shape {tuple(mask.shape)} does not match the gate {tuple(a.shape)}.")
                w = w * mask.to(w.dtype)
            mixed = ql + w.unsqueeze(-1) * (pl - ql)
        return GateOutput(_channels_first(mixed, q.ndim), a, w)


class GeneticGate(Gate):
    """The reference Genetic Attention: w = lambda * (1 - sigmoid(<q, p> / sqrt(C)))."""


class AgreementGate(Gate):
    """w = lambda * a: the child takes more from the parent where the two agree."""

    def mixing_weight(self, a: torch.Tensor) -> torch.Tensor:
        return self.lam * a


class ConstantGate(Gate):
    """Fixed m = q + lambda (p - q) at every position; the reported gate is that constant parent weight."""

    def logits(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.full(q.shape[:-1], torch.logit(torch.tensor(self.lam)).item(), device=q.device)

    def mixing_weight(self, a: torch.Tensor) -> torch.Tensor:
        return torch.full_like(a, self.lam)


class StaticGate(ConstantGate):
    """Fixed m = 0.7 p + 0.3 q (the reference code's unused function), whatever lambda is given."""

    def __init__(self, lam: float = 0.6):
        super().__init__(STATIC_PARENT_WEIGHT)


class LearnedGate(Gate):
    """Genetic gate on learned query/key projections, with lambda = sigmoid(theta) trainable."""

    def __init__(self, dim: int, lam: float = 0.6):
        super().__init__(lam)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.query.weight)
        nn.init.eye_(self.key.weight)
        lam = min(max(lam, 1e-4), 1 - 1e-4)
        # Shape [1], not a scalar: FSDP2's fully_shard refuses 0-dim parameters.
        self.lam_logit = nn.Parameter(torch.tensor([math.log(lam / (1 - lam))]))

    def logits(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # Called as modules (ZeRO-3 gathers their weights in a pre-forward hook), in the projections' own dtype (a
        # bf16 child's adapter is bf16); the gate itself stays in fp32 (see Gate.forward).
        dtype = self.query.weight.dtype
        return (self.query(q.to(dtype)).float() * self.key(p.to(dtype)).float()).sum(-1) / math.sqrt(q.shape[-1])

    def mixing_weight(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lam_logit.float()) * (1.0 - a)


GATES: dict[str, type[Gate]] = {
    "genetic": GeneticGate,
    "agreement": AgreementGate,
    "constant": ConstantGate,
    "static": StaticGate,
    "learned": LearnedGate,
}


def build_gate(name: str, dim: int, lam: float) -> Gate:
    """The gate called `name` for features with `dim` channels."""
    if name not in GATES:
        raise ValueError(f"Unknown gate '{name}'. Choose one of: {', '.join(GATES)}.")
    return LearnedGate(dim, lam) if name == "learned" else GATES[name](lam)
