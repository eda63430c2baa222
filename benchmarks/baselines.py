"""Feature-distillation baselines for the HKT benchmarks, as small `Trainer` subclasses built on the package's
public pieces (its hooks, `hkt_hf.extraction.FeatureExtractor`, and its KD term, `hkt_hf.losses.kd_loss`).

`BaselineTrainer` trains the child on its own loss plus, at the carrier pairs `pairs` ("parent.module=child.module",
the same layer pairs as HKT's `blocks` carriers), one of:

- `hint="mse"`: FitNets / TinyBERT: MSE between a trained linear projection of the child's feature and the parent's;
- `hint="cosine"`: DistilBERT's variant: 1 - cosine similarity of the two along the hidden dimension;
- `stitch=True`: SimKD / SRRL-like stitching: the projected child feature replaces the parent's at that layer and the
  frozen parent's upper layers and head run on it; their loss on the labels (CE) is added, no gate. A training signal
  only, as in SRRL: the child is used and evaluated with its own layers and head (SimKD would deploy the stitched
  parent head too);

plus `kd_weight` x the package's KD term (T^2 KL(parent || child) on the logits, the positions with a target).
The parent runs first, without autograd (the stitched passes record a graph only from the replaced feature on), and
stays frozen; the projections (one `nn.Linear` per pair) are in the optimizer at the Trainer's rate, without weight
decay; `clip_projections=True` clips their gradients at the Trainer's `max_grad_norm` (the CIFAR runs, with SGD; the
language-model runs, with AdamW, were made without it and keep it off). Terms other than the child's own loss are
means over this batch (no gradient accumulation in the benchmarks, so that is the Trainer's normalisation too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from hkt_hf.extraction import FeatureExtractor, FeatureSpec
from hkt_hf.losses import count_items, kd_loss, target_mask

HINTS = (None, "mse", "cosine")


def parse_pairs(pairs: list[str]) -> list[tuple[FeatureSpec, FeatureSpec]]:
    """`"parent.module=child.module"` strings as (parent, child) feature specs; a clear error for anything else."""
    parsed = []
    for text in pairs:
        sides = text.split("=")
        if len(sides) != 2 or not all(s.strip() for s in sides):
            raise ValueError(f"Baseline pair '{text}' is not 'parent.module=child.module' (e.g. "
                             "'model.layers.5=model.layers.1').")
        parsed.append((FeatureSpec.parse(sides[0]), FeatureSpec.parse(sides[1])))
    return parsed


def hidden_size(model: nn.Module, role: str) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"The {role} ({type(model).__name__}) has no config.hidden_size: the baselines' projections "
                         "need the feature width of both models.")
    return size


def channel_dim(feature: torch.Tensor) -> int:
    """The dimension a projection maps: channels of a map [B, C, H, W], else the last (hidden) one."""
    return 1 if feature.ndim == 4 else -1


class Projection(nn.Linear):
    """A trained linear map of the channel / hidden dimension: a 1x1 convolution on maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = channel_dim(x)
        return super().forward(x.movedim(dim, -1)).movedim(-1, dim)


def hint_loss(kind: str, projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNets' MSE, or DistilBERT's 1 - cosine along the channel / hidden dimension, as a mean."""
    if kind == "mse":
        return F.mse_loss(projected.float(), target.float())
    return (1 - F.cosine_similarity(projected.float(), target.float(), dim=channel_dim(projected))).mean()


def model_inputs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without its labels, and without a cache for the models that keep one."""
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    return {**batch, "use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else batch


class BaselineTrainer(Trainer):
    """A `Trainer` whose training loss adds a hint, stitching and/or KD term against a frozen `parent_model`."""

    def __init__(self, model: nn.Module, args: Any, *trainer_args: Any, parent_model: nn.Module, pairs: list[str],
                 hint: str | None = None, stitch: bool = False, weight: float = 1.0, kd_weight: float = 0.0,
                 kd_temperature: float = 1.0, widths: list[tuple[int, int]] | None = None,
                 clip_projections: bool = False, **trainer_kwargs: Any):
        if hint not in HINTS:
            raise ValueError(f"hint must be one of {HINTS}, got {hint!r}.")
        if hint is None and not stitch and kd_weight <= 0:
            raise ValueError("A baseline needs a hint, stitching or kd_weight > 0; else use the plain Trainer.")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.parent_model = parent_model.to(self.args.device)
        self.pairs = parse_pairs(pairs) if hint or stitch else []
        self.hint, self.stitch, self.weight = hint, stitch, weight
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.clip_projections = clip_projections
        if widths is None:
            widths = [(hidden_size(model, "child"), hidden_size(parent_model, "parent"))] * len(self.pairs)
        if len(widths) != len(self.pairs):
            raise ValueError(f"widths has {len(widths)} (child, parent) entries for {len(self.pairs)} pairs.")
        self.projections = nn.ModuleList(Projection(*w) for w in widths).to(self.args.device)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The Trainer's optimizer, with the projections as one more parameter group (no weight decay); with
        `clip_projections`, their gradients clipped at `max_grad_norm` before each step, as the Trainer clips the
        model's (it clips only those: unclipped, the hint's large gradients on feature maps made SGD diverge)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.pairs and not any(g.get("hkt_projections") for g in optimizer.param_groups):
            params = list(self.projections.parameters())
            optimizer.add_param_group({"params": params, "weight_decay": 0.0, "hkt_projections": True})
            if self.clip_projections and self.args.max_grad_norm:
                def clip(*_: Any) -> None:
                    torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)

                optimizer.register_step_pre_hook(clip)
        return optimizer

    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train` with the parent in eval mode and frozen, restored as it was afterwards."""
        parent = self.parent_model
        was_training, grads = parent.training, [p.requires_grad for p in parent.parameters()]
        parent.eval().requires_grad_(False)
        try:
            return super().train(*args, **kwargs)
        finally:
            parent.train(was_training)
            for p, g in zip(parent.parameters(), grads):
                p.requires_grad_(g)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """The child's own loss in evaluation; while training, that plus the baseline's terms."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = model_inputs(self.parent_model, inputs)
        parent_specs = [p for p, _ in self.pairs] if self.hint else []
        parent_out, parent_features = None, {}
        if parent_specs or self.kd_weight > 0:  # the parent's plain pass, first and without autograd
            with torch.no_grad(), FeatureExtractor(self.parent_model, parent_specs, role="parent") as parent_ext:
                parent_out = self.parent_model(**batch)
            parent_features = parent_ext.features
        child = self.accelerator.unwrap_model(model)  # the pairs name the bare child's modules
        with FeatureExtractor(child, [c for _, c in self.pairs], role="child") as child_ext:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        scale = 1.0 if num_items_in_batch is None else count_items(child, inputs["labels"]) / num_items_in_batch
        terms = self.feature_terms(child_ext.features, parent_features, {**batch, "labels": inputs["labels"]})
        if self.kd_weight > 0:
            terms["kd"] = self.kd_weight * kd_loss(outputs.logits, parent_out.logits, self.kd_temperature, "kl",
                                                   target_mask(child, inputs.get("labels")))
        loss = loss + scale * sum(terms.values())
        return (loss, outputs) if return_outputs else loss

    def feature_terms(self, child_features: dict[int, torch.Tensor], parent_features: dict[int, torch.Tensor],
                      batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`weight` x the mean over pairs of the hint and/or stitched losses."""
        terms = {}
        projected = [proj(child_features[i]) for i, proj in enumerate(self.projections)]
        if self.hint:
            hints = [hint_loss(self.hint, q, parent_features[i]) for i, q in enumerate(projected)]
            terms["hint"] = self.weight * torch.stack(hints).mean()
        if self.stitch:
            stitched = [self.stitched_loss(i, q, batch) for i, q in enumerate(projected)]
            terms["stitch"] = self.weight * torch.stack(stitched).mean()
        return terms

    def stitched_loss(self, index: int, projected: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen parent's own loss with its feature at pair `index` replaced by the projected child feature:
        the layers below it run without autograd, those above record a graph back to the projection and child."""
        swap = FeatureExtractor(self.parent_model, [self.pairs[index][0]], replace=lambda _, __: projected,
                                grad_after_replace=True, role="parent")
        with torch.no_grad(), swap:
            return self.parent_model(**batch).loss
