"""The training-only HKT modules (aligners and gates) and their injection into, and removal from, the child.

Like a PEFT adapter, `HKTAdapter` is attached to the child under one prefix while training, so the Trainer's
optimizer and DDP / FSDP / DeepSpeed wrapping see its parameters; `remove_adapter` detaches it, leaving the child
exactly as it was. Its state is never part of the child's weights file: checkpoints hold it in a file of its own,
`hkt_adapter.safetensors`, beside the child's (which stays the plain child's, PEFT children included).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .compat import keys_ignored_on_save

from .carriers import CarrierPair
from .mixture import build_gate
from .model_state import base_of
from .transfer import build_aligner, feature_channels

ADAPTER_NAME = "hkt_adapter"
ADAPTER_WEIGHTS_NAME = "hkt_adapter.safetensors"


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
        self.to_child = nn.ModuleList(
            build_aligner(ps, cs, f"carrier '{c}' (parent -> child)")
            for c, ps, cs in zip(carriers, parent_shapes, child_shapes)
        )
        self.to_parent = nn.ModuleList(
            build_aligner(cs, ps, f"carrier '{c}' (child -> parent)")
            for c, ps, cs in zip(carriers, parent_shapes, child_shapes)
        )
        self.gates = nn.ModuleList(build_gate(gate, feature_channels(cs), lam) for cs in child_shapes)

    def into_parent(self, index: int, mixed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """m mapped into the parent's space by the aligner in its own dtype, then cast to the parent's (a bf16
        parent of an fp32 child gets bf16, the child's gradient stays fp32)."""
        aligner = self.to_parent[index]
        weight = next(aligner.parameters(), None)
        return aligner(mixed if weight is None else mixed.to(weight.dtype)).to(dtype)


def inject_adapter(child: nn.Module, adapter: HKTAdapter) -> None:
    """Attach `adapter` as `hkt_adapter` of the child (of its base model for a PEFT child), replacing any earlier one,
    and keep its keys out of the child's saved weights."""
    remove_adapter(child)
    host = base_of(child)
    host.add_module(ADAPTER_NAME, adapter)
    ignored = keys_ignored_on_save(host)
    if ignored is not None:
        ignored.update(f"{ADAPTER_NAME}.{key}" for key in adapter.state_dict())


def get_adapter(child: nn.Module) -> HKTAdapter | None:
    adapter = getattr(base_of(child), ADAPTER_NAME, None)
    return adapter if isinstance(adapter, HKTAdapter) else None


def remove_adapter(child: nn.Module) -> HKTAdapter | None:
    """Detach and return the adapter; afterwards `child.state_dict()` has exactly its original keys."""
    adapter = get_adapter(child)
    if adapter is not None:
        host = base_of(child)
        delattr(host, ADAPTER_NAME)
        ignored = keys_ignored_on_save(host)
        if ignored is not None:
            ignored.difference_update(f"{ADAPTER_NAME}.{key}" for key in adapter.state_dict())
    return adapter


def save_adapter_state(state: dict[str, torch.Tensor], folder: str | os.PathLike) -> Path:
    """Write the adapter's (full, gathered) state dict to `folder/hkt_adapter.safetensors`."""
    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
    return path


def read_adapter_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter state file; ValueError naming it if it is missing, a dangling symlink, not a
    regular file (never opened then: a FIFO or a device would block or never end), unreadable or not safetensors."""
    path = Path(path)
    advice = "Resume from an earlier complete checkpoint of the same run."
    try:
        info = os.stat(path)
    except FileNotFoundError:
        what = "is a dangling symlink" if path.is_symlink() else "is missing"
        raise ValueError(
            f"{path} {what}: an HKT checkpoint always holds the aligners' and gates' state (an empty file when they "
            f"have no parameters), so this checkpoint is incomplete or not HKT's. {advice}"
        ) from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}). {advice}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file (a directory, a device, a FIFO, or a symlink to one). {advice}")
    try:
        return safetensors.torch.load(path.read_bytes())
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror or err}). {advice}") from None
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupt: not a safetensors file ({err}). {advice}") from None


def load_adapter_state(adapter: HKTAdapter, folder: str | os.PathLike) -> None:
    """Load `folder/hkt_adapter.safetensors` into `adapter` (strict): a resume never goes on with fresh aligners."""
    path = Path(folder) / ADAPTER_WEIGHTS_NAME
    try:
        adapter.load_state_dict(read_adapter_state(path))
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not match this run's aligners and gates ({err}). Resume with the carriers, gate and models "
            "of the run that wrote the checkpoint."
        ) from None
