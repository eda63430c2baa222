"""The task losses the HKT objective computes itself, in fp32: replayed heads (token cross-entropy with the causal
shift and ignore index of transformers' ForCausalLMLoss, chunked so no vocabulary-sized logits are kept for
backward; or transformers' classification loss), and the classic distillation term over positions with a target."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForQuestionAnsweringLoss, ForSequenceClassificationLoss

from .mixture import masked_mean
from .model_state import base_of
from .tasks import QA_TASK, TOKEN_TASKS, loss_task

IGNORE_INDEX = -100
LOSS_CHUNK = 1024  # positions per chunk of a vocabulary-sized loss (replayed heads, KD)


# ---- targets ---------------------------------------------------------------------------------------------------------


def target_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the prediction positions: shifted left (last position ignored) for causal LMs, whose
    position i predicts token i + 1, as in transformers' ForCausalLMLoss; unchanged otherwise."""
    if loss_task(model) == "text-generation":
        return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def count_items(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """This batch's items as the Trainer counts them for `num_items_in_batch`: labels that are not -100."""
    return target_labels(model, labels).ne(IGNORE_INDEX).sum()


def target_mask(model: nn.Module, labels: torch.Tensor | None) -> torch.Tensor | None:
    """[B, N] mask of the positions with a target for token tasks (KD counts only those); None otherwise."""
    if labels is None or loss_task(model) not in TOKEN_TASKS or labels.ndim != 2:
        return None
    return target_labels(model, labels).ne(IGNORE_INDEX)


def _summed_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def fusable(head: nn.Module) -> bool:
    """A plain `nn.Linear` holding its whole weight (not a LoRA layer, not a ZeRO-3 partition or an FSDP2 shard, which
    only their module's forward gathers)."""
    return type(head) is nn.Linear and not hasattr(head.weight, "ds_id") and type(head.weight) in (nn.Parameter,
                                                                                                     torch.Tensor)


def token_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `head(hidden)` over the positions whose target is not -100, and their count, without
    keeping vocabulary-sized logits for backward. A plain linear head goes through `SummedLinearCrossEntropy`
    (gradients computed in forward, nothing recomputed); any other head runs `chunk` positions at a time under
    activation checkpointing (its logits recomputed in backward)."""
    keep = targets.ne(IGNORE_INDEX)
    hidden, targets = hidden[keep], targets[keep]
    if fusable(head):
        return SummedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk), keep.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        total = total + checkpoint(_summed_cross_entropy, head, h, t, use_reentrant=False)
    return total, keep.sum()


def token_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """`token_loss_sum` as a mean over the positions with a target (0 when there are none)."""
    total, count = token_loss_sum(head, hidden, targets, chunk)
    return total / count.clamp(min=1)


class SummedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T + bias` against `targets`, summed over rows, in fp32.

    The gradients with respect to hidden, weight and bias (those that need one) are computed in forward, `chunk` rows
    at a time, and are all that is kept for backward: [rows, hidden] and [vocabulary, hidden] tensors, never the
    [rows, vocabulary] logits, and nothing is recomputed in backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            total += F.cross_entropy(logits, t, reduction="sum")
            d_logits = logits.softmax(-1)
            d_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
            if need_hidden:
                grad_hidden[start:start + chunk] = d_logits.to(weight.dtype) @ weight
            if need_weight:
                grad_weight += (d_logits.T.to(h.dtype) @ h).float()
            if need_bias:
                grad_bias += d_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = tuple(None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors,
                                                                                              ctx.dtypes))
        return (*grads, None, None)


def head_loss(model: nn.Module, head: nn.Module, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's task loss with its prediction head replayed on `hidden`, in fp32, against the batch's targets:
    token cross-entropy (shifted for causal LMs) for token tasks, transformers' question-answering loss (mean of the
    start and end cross-entropies) for extractive QA, its classification loss (`config.problem_type`) otherwise."""
    task = loss_task(model)
    if task in TOKEN_TASKS:
        return token_loss(head, hidden, target_labels(model, inputs["labels"]))
    if task == QA_TASK:
        start, end = head(hidden).float().unbind(-1)
        return ForQuestionAnsweringLoss(start, end, inputs["start_positions"], inputs["end_positions"])
    return ForSequenceClassificationLoss(inputs["labels"], head(hidden).float(), base_of(model).config)


def head_prediction(model: nn.Module, head_output: torch.Tensor) -> torch.Tensor:
    """A head's output laid out as the model's prediction (`objective.prediction`): an extractive QA head's
    [B, N, 2] as [B, 2, N] (start and end logits over the positions); other heads' output as is."""
    return head_output.movedim(-1, 1) if loss_task(model) == QA_TASK else head_output


def kd_loss(child_logits: torch.Tensor, parent_logits: torch.Tensor, temperature: float, kind: str = "kl",
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The classic distillation term, in fp32, as a mean over prediction positions.

    `kind="kl"`: Hinton's T^2 * KL(softmax(parent / T) || softmax(child / T)) per position; dense logits
    [B, C, H, W] (class dimension 1, e.g. semantic segmentation) are distilled per pixel, extractive QA's start and
    end logits [B, 2, N] as two distributions over the positions. `"l1"` / `"mse"`: mean
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
    child_logits, parent_logits = child_logits.flatten(0, -2), parent_logits.flatten(0, -2)
    total = SummedKL.apply(child_logits, parent_logits.detach(), float(temperature), LOSS_CHUNK)
    return total / max(child_logits.shape[0], 1)


class SummedKL(torch.autograd.Function):
    """T^2 * KL(softmax(parent / T) || softmax(child / T)) summed over rows of [rows, classes] logits, in fp32.

    The gradient with respect to the child's logits, T * (softmax(child / T) - softmax(parent / T)), is computed in
    forward, `chunk` rows at a time, and is the only tensor kept for backward (the logits' size and dtype). Plain
    autograd would keep both fp32 log-softmaxes and more: at a 32k vocabulary that is the cost of KD."""

    @staticmethod
    def forward(ctx: Any, child: torch.Tensor, parent: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=child.device)
        grad = torch.empty_like(child)
        for c, p, g in zip(child.split(chunk), parent.split(chunk), grad.split(chunk)):
            # Few passes over the [chunk, vocabulary] tile: the step is memory-bound at vocabulary scale.
            log_c = F.log_softmax(c.float() / temperature if temperature != 1 else c.float(), -1)
            log_p = F.log_softmax(p.float() / temperature if temperature != 1 else p.float(), -1)
            prob_p = log_p.exp()
            total += torch.dot(prob_p.flatten(), log_p.sub_(log_c).flatten())
            prob_c = log_c.exp_().sub_(prob_p)
            g.copy_(prob_c.mul_(temperature) if temperature != 1 else prob_c)
        ctx.save_for_backward(grad)
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def item_mean(error: torch.Tensor, targets: torch.Tensor | None, real: torch.Tensor | None) -> torch.Tensor:
    """A per-position error [B, ...] as a mean over this batch's items, like every other term (so accumulated
    micro-batches give one big batch's value): over the positions with a target where the feature has one position
    per target (token tasks), else per sample over its real positions (all positions of a map), then over samples."""
    if targets is not None and tuple(targets.shape) == tuple(error.shape):
        return masked_mean(error, targets)
    if real is not None:
        error = (error * real).sum(1) / real.sum(1).clamp(min=1)
    return error.flatten(1).mean(1).mean() if error.ndim > 1 else error.mean()
