"""Optical-flow data with exactly known flow, made from real photographs by known warps (the end-point error is in
`hkt_hf.apps.metrics`).

No optical-flow dataset can be downloaded offline, so pairs are built in the manner of FlyingChairs: a background
mosaic of real images (e.g. CIFAR-10, each resized to `tile` pixels) moves by one random similarity transform
(rotation, scale, translation), and 1-2 real images cut to ellipses ("objects") are pasted on top and move by
their own. Frame 1 is the composite; frame 2 renders every layer through its motion (bilinear, background
reflected at the borders, objects premultiplied by their alpha). The flow of each frame-1 pixel is that of the
layer visible there, `M(x) - x`, exact by construction; it is marked valid where `x + flow` lies inside the
frame (pixels occluded in frame 2 keep their true flow, as in FlyingChairs). Pair i is drawn from
`numpy.random.default_rng([seed, i])`, so a split and seed give the same pairs whatever their number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_COLUMNS, find_column, to_rgb_array

BACKGROUND_MOTION = dict(degrees=5.0, scale=0.07, shift=8.0)
OBJECT_MOTION = dict(degrees=15.0, scale=0.15, shift=16.0)


def random_motion(rng: np.random.Generator, centre: tuple[float, float], degrees: float, scale: float,
                  shift: float) -> np.ndarray:
    """A 2x3 similarity transform in pixel coordinates (x, y): rotate and scale about `centre`, then translate."""
    angle = math.radians(rng.uniform(-degrees, degrees))
    s = rng.uniform(1 - scale, 1 + scale)
    t = rng.uniform(-shift, shift, 2)
    a = s * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c = np.asarray(centre, dtype=np.float64)
    return np.concatenate([a, (c - a @ c + t)[:, None]], axis=1)


def invert(motion: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(motion[:, :2])
    return np.concatenate([a_inv, (-a_inv @ motion[:, 2])[:, None]], axis=1)


def pixel_grid(size: int) -> torch.Tensor:
    """Pixel-centre coordinates [size, size, 2] as (x, y), in float64."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def apply(motion: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    m = torch.from_numpy(motion)
    return points @ m[:, :2].T + m[:, 2]


def render(layer: torch.Tensor, motion: np.ndarray, padding: str, points: torch.Tensor) -> torch.Tensor:
    """`layer` [C, S, S] moved by `motion`: output pixel y (of `points`, see `pixel_grid`) shows the layer at
    motion^-1(y) (bilinear)."""
    size = layer.shape[-1]
    source = apply(invert(motion), points)
    grid = (source * 2 / (size - 1) - 1)[None]  # align_corners=True: pixel centres at -1 .. 1
    return F.grid_sample(layer[None], grid, mode="bilinear", padding_mode=padding, align_corners=True)[0]


class KnownWarpFlow(Dataset):
    """`num_pairs` image pairs with exact flow, rendered on the fly from `images` (a `datasets` split of images).

    Items are dicts of `image1`, `image2` (float [3, S, S] scaled to [-1, 1], RAFT's input range), `labels`
    (flow [2, S, S] in pixels, x then y) and `valid` (bool [S, S]).
    """

    def __init__(self, images: Any, num_pairs: int, seed: int, size: int = 128, tile: int = 32,
                 object_side: tuple[int, int] = (40, 72)):
        if size % 8 or size < 128:
            raise ValueError(f"size must be a multiple of 8 and at least 128 (RAFT's minimum), got {size}.")
        self.images = images
        self.column = find_column(images.column_names, IMAGE_COLUMNS, "image")
        self.num_pairs, self.seed, self.size, self.tile, self.object_side = num_pairs, seed, size, tile, object_side
        self.points = pixel_grid(size)  # the same for every pair and layer

    def __len__(self) -> int:
        return self.num_pairs

    def _image(self, index: int, side: int) -> torch.Tensor:
        array = to_rgb_array(self.images[int(index)][self.column])
        resized = np.array(Image.fromarray(array).resize((side, side), Image.BILINEAR))
        return torch.from_numpy(resized).permute(2, 0, 1).double() / 127.5 - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_pairs:
            raise IndexError(f"pair {i} out of range for {self.num_pairs} pairs")
        rng = np.random.default_rng([self.seed, i])
        size, tile = self.size, self.tile
        tiles = -(-size // tile)
        picks = rng.integers(0, len(self.images), tiles * tiles + 2)
        rows = [torch.cat([self._image(picks[r * tiles + c], tile) for c in range(tiles)], dim=2) for r in range(tiles)]
        background = torch.cat(rows, dim=1)[:, :size, :size]
        points = self.points
        centre = ((size - 1) / 2, (size - 1) / 2)
        motion = random_motion(rng, centre, **BACKGROUND_MOTION)
        frame1, frame2 = background.clone(), render(background, motion, "reflection", points)
        flow = apply(motion, points) - points
        for k in range(int(rng.integers(1, 3))):
            side = int(rng.integers(self.object_side[0], self.object_side[1] + 1))
            left, top = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, 2))
            # The object's layer in frame-1 coordinates: a binary ellipse (alpha) and its colours premultiplied.
            alpha = torch.zeros(1, size, size, dtype=torch.float64)
            colour = torch.zeros(3, size, size, dtype=torch.float64)
            r = (side - 1) / 2
            inside = ((points[..., 0] - left - r) / (r + 0.5)) ** 2 + ((points[..., 1] - top - r) / (r + 0.5)) ** 2 <= 1
            image = self._image(picks[tiles * tiles + k], side)
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, size), min(left + side, size)
            colour[:, y0:y1, x0:x1] = image[:, y0 - top : y1 - top, x0 - left : x1 - left]
            alpha[0] = inside.double()
            colour = colour * alpha
            motion = random_motion(rng, (left + r, top + r), **OBJECT_MOTION)
            frame1 = frame1 * (1 - alpha) + colour
            moved = render(torch.cat([colour, alpha]), motion, "zeros", points)
            frame2 = frame2 * (1 - moved[3:]) + moved[:3]
            flow = torch.where(inside[..., None], apply(motion, points) - points, flow)
        target = points + flow
        valid = ((target >= 0) & (target <= size - 1)).all(dim=-1)
        return {"image1": frame1.float(), "image2": frame2.float(), "labels": flow.permute(2, 0, 1).float(),
                "valid": valid}
