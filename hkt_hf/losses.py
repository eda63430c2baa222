"""The task losses the HKT objective computes itself, in fp32: replayed heads (token cross-entropy with the causal
shift and ignore index of transformers' ForCausalLMLoss, chunked so no vocabulary-sized logits are kept for
backward; or transformers' classification loss), and the classic distillation term over positions with a target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from .extraction import base_of
from .tasks import task_of

IGNORE_INDEX = -100
LOSS_CHUNK = 1024  # positions per chunk of a replayed vocabulary-sized head
# Tasks with one target per token; their heads are replayed position by position.
TOKEN_TASKS = frozenset({"text-generation", "text2text-generation", "fill-mask", "token-classification"})


# ---- targets ---------------------------------------------------------------------------------------------------------


def target_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the prediction positions: shifted left (last position ignored) for causal LMs, whose
    position i predicts token i + 1, as in transformers' ForCausalLMLoss; unchanged otherwise."""
    if task_of(model) == "text-generation":
        return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def count_items(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """This batch's items as the Trainer counts them for `num_items_in_batch`: labels that are not -100."""
    return target_labels(model, labels).ne(IGNORE_INDEX).sum()


def target_mask(model: nn.Module, labels: torch.Tensor) -> torch.Tensor | None:
    """[B, N] mask of the positions with a target for token tasks (KD counts only those); None otherwise."""
    if task_of(model) not in TOKEN_TASKS or labels.ndim != 2:
        return None
    return target_labels(model, labels).ne(IGNORE_INDEX)


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def token_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` over the positions whose target is not -100, as a mean over them (0 when there
    are none). The head runs on those positions only, `chunk` at a time under activation checkpointing, so no
    vocabulary-sized logits are kept for backward: they are recomputed chunk by chunk."""
    keep = targets.ne(IGNORE_INDEX)
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        total = total + checkpoint(_summed_cross_entropy, head, h, t, use_reentrant=False)
    return total / keep.sum().clamp(min=1)


def head_loss(model: nn.Module, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's task loss with its prediction head replayed on `hidden`, in fp32: token cross-entropy (shifted for
    causal LMs) for token tasks, transformers' classification loss (`config.problem_type`) otherwise."""
    if task_of(model) in TOKEN_TASKS:
        return token_loss(head, hidden, target_labels(model, labels))
    return ForSequenceClassificationLoss(labels, head(hidden).float(), base_of(model).config)


def kd_loss(child_logits: torch.Tensor, parent_logits: torch.Tensor, temperature: float, kind: str = "kl",
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The classic distillation term, in fp32, as a mean over prediction positions.

    `kind="kl"`: Hinton's T^2 * KL(softmax(parent / T) || softmax(child / T)) per position; dense logits
    [B, C, H, W] (class dimension 1, e.g. semantic segmentation) are distilled per pixel. `"l1"` / `"mse"`: mean
    absolute / squared difference of the predictions, for regression outputs (e.g. optical flow). `mask` ([B, N] for
    token logits [B, N, V]) keeps only the positions with a target.
    """
    if mask is not None:
        child_logits, parent_logits = child_logits[mask], parent_logits[mask]
    if kind != "kl":
        diff = child_logits.float() - parent_logits.float()
        return diff.abs().mean() if kind == "l1" else diff.square().mean()
    if child_logits.ndim == 4:
        child_logits, parent_logits = child_logits.movedim(1, -1), parent_logits.movedim(1, -1)
    c = F.log_softmax(child_logits.float().flatten(0, -2) / temperature, -1)
    p = F.log_softmax(parent_logits.float().flatten(0, -2) / temperature, -1)
    total = F.kl_div(c, p, reduction="sum", log_target=True)
    return total / max(c.shape[0], 1) * temperature**2
