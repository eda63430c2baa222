"""Segmentation data: a reproducible segmentation task built from real classification images, and any Hub
segmentation dataset prepared for SegFormer-style models (mean IoU is in `hkt_hf.apps.metrics`).

The "pasted objects" task (no segmentation dataset can be downloaded offline): each scene is a 64x64 canvas with a
smooth random colour background (label 0) onto which 2-4 real images (e.g. CIFAR-10) are pasted, each resized to a
random square side in [20, 32] at a random position, later ones occluding earlier ones. The mask of a pasted image
is its whole square, labelled with its class + 1. Scene i is drawn from `numpy.random.default_rng([seed, i])`, so the
same source split and seed give the same scenes bit for bit, whatever the number of scenes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import BaseImageProcessor

from .images import IMAGE_COLUMNS, LABEL_COLUMNS, find_column, to_rgb_array

MASK_COLUMNS = ("label", "annotation", "mask", "semantic_mask", "segmentation_mask", "labels")
SCENE_IMAGE_COLUMNS = ("image", *IMAGE_COLUMNS)
BACKGROUND = 0


def random_background(rng: np.random.Generator, size: int, grid: int = 4) -> np.ndarray:
    """A smooth random colour field (a `grid` x `grid` grid of random colours, bilinearly upsampled) plus noise."""
    coarse = rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def paste_scene(
    images: list[np.ndarray],
    classes: list[int],
    rng: np.random.Generator,
    size: int = 64,
    side_range: tuple[int, int] = (20, 32),
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: `images` (HxWx3 uint8) pasted in order onto a random background; mask = class + 1, 0 elsewhere."""
    low, high = side_range
    if not 0 < low <= high <= size:
        raise ValueError(f"side_range {side_range} must satisfy 0 < low <= high <= canvas size {size}.")
    canvas = random_background(rng, size)
    mask = np.full((size, size), BACKGROUND, dtype=np.uint8)
    for image, cls in zip(images, classes):
        side = int(rng.integers(low, high + 1))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        resized = Image.fromarray(image).resize((side, side), Image.BILINEAR)
        canvas[top : top + side, left : left + side] = np.asarray(resized)
        mask[top : top + side, left : left + side] = cls + 1
    return canvas, mask


def make_pasted_segmentation(
    source: Dataset,
    num_scenes: int,
    seed: int,
    size: int = 64,
    objects: tuple[int, int] = (2, 4),
    side_range: tuple[int, int] = (20, 32),
) -> Dataset:
    """`num_scenes` scenes (columns `image`, `label`: PIL image and PIL mask) from a classification dataset.

    Source rows are drawn at random with the seeded generator, so a label-sorted source needs no shuffling. Use
    different source splits for training and evaluation scenes, so that no object image is seen in both.
    """
    if num_scenes <= 0:
        raise ValueError(f"num_scenes must be positive, got {num_scenes}.")
    image_column = find_column(source.column_names, IMAGE_COLUMNS, "image")
    label_column = find_column(source.column_names, LABEL_COLUMNS, "label")
    num_classes = len(set(source[label_column]))
    if num_classes > 254:
        raise ValueError(f"The source has {num_classes} classes; masks are uint8 with 0 = background, so at most 254.")
    # One generator per scene: scene i is the same whatever num_scenes is.
    rngs = [np.random.default_rng([seed, i]) for i in range(num_scenes)]
    rows = [rng.integers(0, len(source), int(rng.integers(objects[0], objects[1] + 1))) for rng in rngs]
    picked = source.select(np.concatenate(rows).tolist())
    arrays, classes = [to_rgb_array(img) for img in picked[image_column]], picked[label_column]
    scenes, masks, start = [], [], 0
    for rng, scene_rows in zip(rngs, rows):
        stop = start + len(scene_rows)
        canvas, mask = paste_scene(arrays[start:stop], classes[start:stop], rng, size, side_range)
        scenes.append(Image.fromarray(canvas))
        masks.append(Image.fromarray(mask))
        start = stop
    return Dataset.from_dict({"image": scenes, "label": masks})


def segmentation_transform(
    processor: BaseImageProcessor, train: bool, image_column: str, mask_column: str
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """A batch transform for `Dataset.set_transform`: random horizontal flip of image and mask when `train`, then
    the image processor, which resizes and normalises the image and resizes the mask (nearest) to the same size.

    Flips come from torch's global generator, which `Trainer` seeds, so each run's augmentation depends on its own
    seed only, not on what ran before it in the same process.
    """

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [Image.fromarray(to_rgb_array(img)) for img in batch[image_column]]
        masks = [m if isinstance(m, Image.Image) else Image.fromarray(np.asarray(m, dtype=np.uint8))
                 for m in batch[mask_column]]
        if train:
            flips = torch.rand(len(images)) < 0.5
            images = [i.transpose(Image.FLIP_LEFT_RIGHT) if f else i for i, f in zip(images, flips)]
            masks = [m.transpose(Image.FLIP_LEFT_RIGHT) if f else m for m, f in zip(masks, flips)]
        out = processor(images, segmentation_maps=masks, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "labels": out["labels"].long()}

    return transform


def prepare_segmentation_dataset(dataset: Dataset, processor: BaseImageProcessor, train: bool) -> Dataset:
    """Attach the on-the-fly transform (use `remove_unused_columns=False`); finds the image and mask columns."""
    if len(dataset) == 0:
        raise ValueError("The segmentation dataset is empty.")
    image_column = find_column(dataset.column_names, SCENE_IMAGE_COLUMNS, "image")
    mask_column = find_column(dataset.column_names, MASK_COLUMNS, "segmentation mask")
    dataset.set_transform(segmentation_transform(processor, train, image_column, mask_column))
    return dataset
