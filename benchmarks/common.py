"""What the CIFAR-10 benchmarks share: where the shared data and checkpoints live, a uint8 decode cache, a tensor
dataset with the package's augmentation, the reference training recipe and the fast CPU setup.

Benchmarks may read ../shared (the package never does). JPEG decoding is done once per split and cached under
benchmarks/.cache/ (gitignored); each training step then only crops, flips and normalises uint8 arrays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import CACHE, REPO
from torch import nn
from torch.utils.data import Dataset

from hkt_hf.apps.data.images import load_image_dataset, random_crop_flip, strided_subset, to_rgb_array
from hkt_hf.apps.models import IMAGENET_MEAN, IMAGENET_STD, CifarResNetForImageClassification
from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

SHARED = REPO.parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
MODELS_DIR = SHARED / "models" / "cifar-resnet"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}

# The reference CIFAR recipe (method doc): SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128,
# random crop with 4 pixels of zero padding + horizontal flip, ImageNet mean/std.
LR, MOMENTUM, WEIGHT_DECAY, BATCH_SIZE, PADDING = 0.01, 0.9, 1e-4, 128, 4

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the benchmarks need the shared CIFAR-10 data and checkpoints beside the repository "
            f"(expected in {SHARED})."
        )
    return path


def load_pretrained(name: str) -> CifarResNetForImageClassification:
    """A reference checkpoint ('resnet20' or 'resnet56') as a transformers model, in eval mode."""
    return import_checkpoint(require(MODELS_DIR / CHECKPOINTS[name]))


def decoded_split(split: str, rows: int | None = None, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] uint8 and labels [N] of a shared CIFAR-10 split (a strided subset of `rows`), decoded
    from JPEG once and cached as .npz."""
    path = cache / f"cifar10-{split}-{rows or 'all'}.npz"
    if not path.exists():
        ds = load_image_dataset(str(require(CIFAR_DIR / f"{split}.parquet")))[split]
        ds = strided_subset(ds, rows)
        images = np.stack([to_rgb_array(img) for img in ds["img"]])
        labels = np.asarray(ds["label"], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    with np.load(path) as blob:
        return blob["images"], blob["labels"]


def normalise(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float, rescaled to [0, 1] and normalised with ImageNet mean/std, exactly as
    `hkt_hf.apps.models.cifar_image_processor()` does (checked in tests/test_benchmarks.py)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


class CifarTensors(Dataset):
    """Decoded CIFAR images as `{"pixel_values", "labels"}` rows; `train=True` applies `random_crop_flip`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"Need as many images as labels, and at least one: got {len(images)} and {len(labels)}.")
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i]
        if self.train:
            image = random_crop_flip(image, PADDING)
        return {"pixel_values": normalise(image), "labels": int(self.labels[i])}


def prepare(model: nn.Module, bf16: bool) -> nn.Module:
    """Channels-last weights for bf16 autocast (oneDNN's bf16 convolutions are several times faster so on this CPU);
    fp32 models stay as they are (channels-last was slower in fp32)."""
    return model.to(memory_format=torch.channels_last) if bf16 else model


def recipe_args(
    args_class: type, output_dir: Path | str, seed: int, max_steps: int, bf16: bool, batch_size: int = BATCH_SIZE,
    lr: float = LR, **extra: Any,
):
    """Training arguments of the shared recipe for `args_class` (TrainingArguments or HKTTrainingArguments)."""
    return args_class(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=bf16,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        optim="sgd",
        optim_args=f"momentum={MOMENTUM}",
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, min(50, max_steps // 4)),
        **extra,
    )
