"""Image-classification data: CIFAR-10 (or any dataset with the same columns) from the Hub or local parquet files,
with the standard CIFAR augmentation applied on the fly through `datasets` transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from PIL import Image
from transformers import BaseImageProcessor, DefaultDataCollator

CIFAR10_HUB_ID = "uoft-cs/cifar10"
IMAGE_COLUMNS = ("img", "image", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def load_image_dataset(name_or_path: str = CIFAR10_HUB_ID, **kwargs: Any) -> DatasetDict:
    """Load a Hub dataset by id, or a local folder of `<split>.parquet` files in the Hub's column layout."""
    path = Path(name_or_path)
    if path.is_dir():
        files = {p.stem: str(p) for p in sorted(path.glob("*.parquet"))}
        if not files:
            raise FileNotFoundError(f"{path} holds no *.parquet files; expected e.g. train.parquet and test.parquet.")
        return load_dataset("parquet", data_files=files, **kwargs)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"No parquet file at {path}.")
        return load_dataset("parquet", data_files={path.stem: str(path)}, **kwargs)
    if path.is_file():
        raise ValueError(f"{path} is not a .parquet file. Pass a folder of <split>.parquet files or one .parquet file.")
    return load_dataset(name_or_path, **kwargs)


def find_column(column_names: list[str], candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` present in `column_names`, or a clear error listing what is there."""
    for name in candidates:
        if name in column_names:
            return name
    raise ValueError(f"No {what} column: looked for {list(candidates)}, the dataset has {column_names}.")


def random_crop_flip(image: np.ndarray, padding: int = 4, generator: torch.Generator | None = None) -> np.ndarray:
    """CIFAR augmentation on an HxWxC uint8 array: zero-pad, random crop back to size, horizontal flip with p=0.5."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    flip = torch.rand((), generator=generator).item() < 0.5
    out = padded[top : top + h, left : left + w]
    return out[:, ::-1] if flip else out


def array_to_image(array: np.ndarray) -> Image.Image:
    """A PIL image from an HxW or HxWxC (C in 1, 3, 4; CxHxW is transposed) array of 8-bit or 16-bit integers."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
    if not shape_ok or array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 65535:
        raise ValueError(
            f"Cannot read an image from an array of shape {array.shape} and dtype {array.dtype}: expected HxW or "
            "HxWxC (C = 1, 3 or 4) integers in 0..255 (or 0..65535 for 16-bit). Scale float images to uint8 "
            "(e.g. (x * 255).round().astype('uint8')), or store PIL images (datasets.Image feature)."
        )
    if array.max() > 255 or array.dtype == np.uint16:  # 16-bit: keep the full range in 8 bits
        return Image.fromarray(np.round(array / 257.0).astype(np.uint8))
    return Image.fromarray(array.astype(np.uint8))


def to_rgb_array(image: Image.Image | np.ndarray, num_channels: int = 3) -> np.ndarray:
    """Decode to an HxWxC uint8 array, converting grey, RGBA, palette or 16-bit images to the channel count the
    model expects."""
    if not isinstance(image, Image.Image):  # an array, or the nested lists `datasets` gives for array columns
        image = array_to_image(np.asarray(image))
    elif image.mode.startswith("I;16") or image.mode in ("I", "F"):  # PIL's convert() would clip at 255
        image = array_to_image(np.asarray(image))
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is None:
        raise ValueError(f"Only 1- or 3-channel models are supported for PIL images, got num_channels={num_channels}.")
    array = np.asarray(image.convert(mode))
    return array[..., None] if array.ndim == 2 else array


def image_transform(
    processor: BaseImageProcessor,
    train: bool,
    image_column: str = "img",
    label_column: str = "label",
    padding: int = 4,
    num_channels: int = 3,
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """A batch transform for `Dataset.set_transform`: decode, augment when `train`, then run the image processor."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        arrays = [to_rgb_array(img, num_channels) for img in batch[image_column]]
        if train:
            arrays = [np.ascontiguousarray(random_crop_flip(a, padding)) for a in arrays]
        pixel_values = processor([Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arrays],
                                 return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column])}

    return transform


def prepare_image_dataset(
    dataset: DatasetDict,
    processor: BaseImageProcessor,
    train_split: str | None = "train",
    num_channels: int = 3,
) -> DatasetDict:
    """Attach on-the-fly transforms: augmentation on `train_split`, plain preprocessing on every other split.

    Use with `remove_unused_columns=False` in the training arguments: the transform needs the raw image column.
    """
    mean = getattr(processor, "image_mean", None)
    if getattr(processor, "do_normalize", False) and isinstance(mean, (list, tuple)) and len(mean) != num_channels:
        raise ValueError(
            f"The image processor normalises {len(mean)} channels (image_mean={list(mean)}) but num_channels="
            f"{num_channels}: pass num_channels={len(mean)}, or a processor whose image_mean and image_std have "
            f"{num_channels} value(s)."
        )
    columns = next(iter(dataset.values())).column_names
    image_column = find_column(columns, IMAGE_COLUMNS, "image")
    label_column = find_column(columns, LABEL_COLUMNS, "label")
    for split, ds in dataset.items():
        if len(ds) == 0:
            raise ValueError(f"Split '{split}' of the dataset is empty.")
        ds.set_transform(image_transform(processor, split == train_split, image_column, label_column,
                                         num_channels=num_channels))
    return dataset


def image_collator() -> DefaultDataCollator:
    """Stacks `pixel_values` and `labels` into batch tensors (transformers' own collator does exactly this)."""
    return DefaultDataCollator(return_tensors="pt")


def strided_subset(ds, n: int | None):
    """`n` rows spread evenly over `ds` (shared CIFAR parquet rows are sorted by label: never take a head slice)."""
    if n is None or n >= len(ds):
        return ds.select(range(len(ds)))
    if n <= 0:
        raise ValueError(f"Subset size must be positive, got {n}.")
    return ds.select(np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())

