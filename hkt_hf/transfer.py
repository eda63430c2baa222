"""Transfer (the T of ETM): map a feature from one network's space into the other's.

Identity where the channel (vectors, maps) or hidden (tokens) sizes match (the reference setting). Otherwise a small
trainable aligner: Linear on the feature dimension for vectors [B, C] and tokens [B, N, D], 1x1 conv for maps
[B, C, H, W]. Aligners never depend on a batch's token count or spatial size: `match_size` resizes a map to the
size of the feature it meets in the current batch, and refuses token features of different lengths (parent and
child must see the same tokens). Aligners exist for training only and are never part of the exported child.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = {1: "vector [C]", 2: "tokens [N, D]", 3: "map [C, H, W]"}


def feature_kind(shape: tuple[int, ...]) -> str:
    """Name of a per-sample feature shape (batch dimension excluded), or an error for unsupported ranks."""
    if len(shape) not in KINDS:
        raise ValueError(
            f"Unsupported carrier feature of per-sample shape {tuple(shape)}: HKT mixes vectors [C], tokens [N, D] "
            "or maps [C, H, W]. Pick a module whose output has one of these shapes."
        )
    return KINDS[len(shape)]


def feature_channels(shape: tuple[int, ...]) -> int:
    """The dimension aligners map and gates reduce over: C for vectors and maps, D for tokens."""
    feature_kind(shape)
    return shape[0] if len(shape) == 3 else shape[-1]


class Aligner(nn.Module):
    """Projects the channel (vectors, maps) or hidden (tokens) dimension; sizes along tokens or space pass through.

    `src_shape` / `dst_shape` record the per-sample shapes seen when it was built, for display only.
    """

    def __init__(self, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]):
        super().__init__()
        self.src_shape, self.dst_shape = tuple(src_shape), tuple(dst_shape)
        src_c, dst_c = feature_channels(self.src_shape), feature_channels(self.dst_shape)
        if len(src_shape) == 3:
            self.proj = nn.Conv2d(src_c, dst_c, kernel_size=1) if src_c != dst_c else nn.Identity()
        else:
            self.proj = nn.Linear(src_c, dst_c) if src_c != dst_c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"channels {feature_channels(self.src_shape)} -> {feature_channels(self.dst_shape)}"


def build_aligner(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], what: str = "carrier") -> nn.Module:
    """`nn.Identity` for equal channel sizes, an `Aligner` for other shapes of the same kind, else a clear error."""
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    src_kind, dst_kind = feature_kind(src_shape), feature_kind(dst_shape)
    if src_kind != dst_kind:
        raise ValueError(
            f"Cannot align {what}: a {src_kind} feature of shape {src_shape} with a {dst_kind} feature of shape "
            f"{dst_shape}. Pair modules whose outputs are of the same kind (for example both pooled vectors, or "
            "both feature maps)."
        )
    if feature_channels(src_shape) == feature_channels(dst_shape):
        return nn.Identity()
    return Aligner(src_shape, dst_shape)


def resize_map(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A map [B, C, H, W] at spatial `size`: adaptive average pooling to shrink, bilinear interpolation to grow."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if all(d <= s for d, s in zip(size, x.shape[2:])):
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def match_size(x: torch.Tensor, target: torch.Tensor, what: str = "carrier") -> torch.Tensor:
    """`x` at the token count / spatial size of `target` in this batch (both [B, ...], channels may differ).

    Maps are resized; token features must already have the same length, since mixing token i of one network with
    token i of the other only means something when both saw the same tokens.
    """
    if x.ndim == 4:
        return resize_map(x, tuple(target.shape[2:]))
    if x.ndim == 3 and x.shape[1] != target.shape[1]:
        raise ValueError(
            f"Cannot mix {what}: its token features have {x.shape[1]} and {target.shape[1]} positions in this batch. "
            "HKT needs token-aligned inputs: parent and child must read the same tokens (one tokenizer, the same "
            "padding and truncation), and token carriers must be at layers with one feature per input token."
        )
    return x
