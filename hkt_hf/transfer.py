"""Transfer (the T of ETM): map a feature from one network's space into the other's.

Identity where shapes match (the reference setting). Otherwise a small trainable aligner: Linear on the feature
dimension for vectors [B, C] and tokens [B, N, D], 1x1 conv for maps [B, C, H, W], then resizing of the token
count or spatial size. Aligners exist for training only and are never part of the exported child.
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


class Aligner(nn.Module):
    """Projects the channel (vectors, maps) or hidden (tokens) dimension, then resizes tokens or maps."""

    def __init__(self, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]):
        super().__init__()
        self.src_shape, self.dst_shape = tuple(src_shape), tuple(dst_shape)
        if len(src_shape) == 3:
            src_c, dst_c = src_shape[0], dst_shape[0]
            self.proj = nn.Conv2d(src_c, dst_c, kernel_size=1) if src_c != dst_c else nn.Identity()
        else:
            src_c, dst_c = src_shape[-1], dst_shape[-1]
            self.proj = nn.Linear(src_c, dst_c) if src_c != dst_c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if x.ndim == 3 and x.shape[1] != self.dst_shape[0]:  # token count
            x = F.interpolate(x.transpose(1, 2), size=self.dst_shape[0], mode="linear").transpose(1, 2)
        elif x.ndim == 4 and tuple(x.shape[2:]) != self.dst_shape[1:]:  # spatial size
            if all(d <= s for d, s in zip(self.dst_shape[1:], x.shape[2:])):
                x = F.adaptive_avg_pool2d(x, self.dst_shape[1:])
            else:
                x = F.interpolate(x, size=self.dst_shape[1:], mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"{self.src_shape} -> {self.dst_shape}"


def build_aligner(src_shape: tuple[int, ...], dst_shape: tuple[int, ...], what: str = "carrier") -> nn.Module:
    """`nn.Identity` for equal shapes, an `Aligner` for shapes of the same kind, else a clear error."""
    src_shape, dst_shape = tuple(src_shape), tuple(dst_shape)
    if src_shape == dst_shape:
        return nn.Identity()
    src_kind, dst_kind = feature_kind(src_shape), feature_kind(dst_shape)
    if src_kind != dst_kind:
        raise ValueError(
            f"Cannot align {what}: a {src_kind} feature of shape {src_shape} with a {dst_kind} feature of shape "
            f"{dst_shape}. Pair modules whose outputs are of the same kind (for example both pooled vectors, or "
            "both feature maps)."
        )
    return Aligner(src_shape, dst_shape)
