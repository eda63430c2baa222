"""The training-only HKT modules (aligners and gates) and their injection into, and removal from, the child.

Like a PEFT adapter, `HKTAdapter` is attached to the child under one prefix while training, so the Trainer's
optimizer, DDP wrapping and checkpoints see its parameters; `remove_adapter` detaches it, leaving the child
exactly as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .carriers import CarrierPair
from .mixture import GateOutput, build_gate
from .transfer import build_aligner, feature_kind

ADAPTER_NAME = "hkt_adapter"


def channels(shape: tuple[int, ...]) -> int:
    """Channel count the gate is computed over: C for vectors and maps, D for tokens."""
    feature_kind(shape)
    return shape[0] if len(shape) == 3 else shape[-1]


class HKTAdapter(nn.Module):
    """Per carrier: T (parent -> child space), T' (child -> parent space, for the parent-head term) and a gate."""

    def __init__(
        self,
        carriers: list[CarrierPair],
        parent_shapes: list[tuple[int, ...]],
        child_shapes: list[tuple[int, ...]],
        gate: str,
        lam: float,
    ):
        super().__init__()
        self.carrier_names = [str(c) for c in carriers]
        self.to_child = nn.ModuleList(
            build_aligner(ps, cs, f"carrier '{c}' (parent -> child)")
            for c, ps, cs in zip(carriers, parent_shapes, child_shapes)
        )
        self.to_parent = nn.ModuleList(
            build_aligner(cs, ps, f"carrier '{c}' (child -> parent)")
            for c, ps, cs in zip(carriers, parent_shapes, child_shapes)
        )
        self.gates = nn.ModuleList(build_gate(gate, channels(cs), lam) for cs in child_shapes)

    def mix(self, index: int, q: torch.Tensor, parent_feature: torch.Tensor) -> GateOutput:
        """m for carrier `index` from the child feature q and the raw parent feature."""
        p = self.to_child[index](parent_feature.to(q.dtype))
        return self.gates[index](q, p)

    def into_parent(self, index: int, mixed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """m mapped into the parent's space, in the parent's dtype."""
        return self.to_parent[index](mixed.to(dtype))


def inject_adapter(child: nn.Module, adapter: HKTAdapter) -> None:
    """Attach `adapter` to `child` as `child.hkt_adapter` (replacing any earlier one)."""
    if isinstance(getattr(child, ADAPTER_NAME, None), HKTAdapter):
        remove_adapter(child)
    child.add_module(ADAPTER_NAME, adapter)


def get_adapter(child: nn.Module) -> HKTAdapter | None:
    adapter = getattr(child, ADAPTER_NAME, None)
    return adapter if isinstance(adapter, HKTAdapter) else None


def remove_adapter(child: nn.Module) -> HKTAdapter | None:
    """Detach and return the adapter; afterwards `child.state_dict()` has exactly its original keys."""
    adapter = get_adapter(child)
    if adapter is not None:
        delattr(child, ADAPTER_NAME)
    return adapter
