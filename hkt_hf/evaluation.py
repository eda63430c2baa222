"""Top-1 accuracy of an image classifier on a prepared dataset, the number every HKT comparison reports."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .data import image_collator


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
