"""The numbers the applications report: top-1 accuracy of an image classifier (what every HKT comparison on images
reports), mean IoU and pixel accuracy of a segmentation model, and end-point error of an optical-flow model."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import DefaultDataCollator, PreTrainedModel

from .data.images import image_collator
from .models.raft import end_point_error


@torch.no_grad()
def top1_accuracy(
    model: PreTrainedModel,
    dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """Percentage of rows whose arg-max logit equals the label; `dataset` yields `pixel_values` and `labels`."""
    if len(dataset) == 0:
        raise ValueError("Cannot evaluate on an empty dataset.")
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=image_collator())
    correct = 0
    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        correct += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
    return 100.0 * correct / len(dataset)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_labels: int, ignore_index: int = 255) -> np.ndarray:
    """[num_labels, num_labels] counts, rows = true class, columns = predicted class; `ignore_index` pixels skipped."""
    valid = target != ignore_index
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    if target.size and (target.min() < 0 or target.max() >= num_labels):
        raise ValueError(f"Mask values must lie in [0, {num_labels}) or equal ignore_index {ignore_index}.")
    return np.bincount(target * num_labels + pred, minlength=num_labels**2).reshape(num_labels, num_labels)


def iou_scores(confusion: np.ndarray) -> dict[str, float]:
    """Mean IoU over the classes that occur in the truth or the predictions, and pixel accuracy, in percent."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    if not present.any():
        raise ValueError("The confusion matrix is empty: no pixel was evaluated.")
    return {
        "mean_iou": float(100.0 * (tp[present] / union[present]).mean()),
        "pixel_accuracy": float(100.0 * tp.sum() / confusion.sum()),
    }


@torch.no_grad()
def evaluate_segmentation(
    model: torch.nn.Module, dataset, num_labels: int, batch_size: int = 64, ignore_index: int = 255
) -> dict[str, float]:
    """mIoU and pixel accuracy of a segmentation model on a prepared dataset, at the masks' resolution.

    Logits at a lower resolution (SegFormer predicts at 1/4) are upsampled bilinearly first, as its loss does.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=DefaultDataCollator(return_tensors="pt")):
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            labels = batch["labels"]
            logits = torch.nn.functional.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                                                     align_corners=False)
            confusion += confusion_matrix(logits.argmax(1).cpu().numpy(), labels.numpy(), num_labels, ignore_index)
    finally:
        model.train(was_training)
    return iou_scores(confusion)


@torch.no_grad()
def evaluate_flow(model: torch.nn.Module, dataset: Dataset, batch_size: int = 16) -> dict[str, float]:
    """End-point error of `model` over the valid pixels of `dataset` (pixel-weighted mean, as on Sintel/KITTI),
    and the share of valid pixels within 1, 3 and 5 pixels, in percent. Runs the model alone, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, within = 0.0, 0, {1: 0, 3: 0, 5: 0}
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            flow = model(image1=batch["image1"].to(device), image2=batch["image2"].to(device)).predicted_flow
            epe = end_point_error(flow.cpu(), batch["labels"])[batch["valid"]]
            total += epe.double().sum().item()
            count += epe.numel()
            for px in within:
                within[px] += int((epe < px).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The evaluation pairs have no valid pixel; cannot compute the end-point error.")
    return {"epe": total / count, **{f"{px}px": 100.0 * n / count for px, n in within.items()}}
