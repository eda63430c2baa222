"""The HKT training objective for one batch: one parent pass, one child pass, and the three loss terms.

    L = w0 * L_c   (the child's own task loss)
      + w1 * L_c*  (the child's task loss with its carrier feature replaced by m)
      + w2 * L_p*  (the frozen parent's task loss with its carrier feature replaced by m, mapped into its space)
      + kd * KD    (optional classic distillation on the logits)

When the single carrier is the input of both classification heads (the reference setting), L_c* and L_p* replay
just the heads on m: one child pass with autograd and one parent pass without. For carriers elsewhere, the parent
runs once under no_grad and records a graph only downstream of its carriers, and the child runs a second,
equally truncated pass with m in place of its carrier features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss

from .adapter import HKTAdapter
from .carriers import CarrierPair, find_head
from .tasks import is_classifier
from .extraction import FeatureExtractor
from .mixture import GateOutput

NativeLoss = Callable[[dict[str, Any]], tuple[torch.Tensor, Any]]


@dataclass
class StepResult:
    loss: torch.Tensor
    outputs: Any
    parts: dict[str, torch.Tensor]
    gates: dict[str, GateOutput] = field(default_factory=dict)


def classification_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss transformers' classifiers use (cross-entropy, MSE or BCE by `config.problem_type`), in fp32."""
    return ForSequenceClassificationLoss(labels, logits.float(), model.config)


def kd_loss(child_logits: torch.Tensor, parent_logits: torch.Tensor, temperature: float, kind: str = "kl"
            ) -> torch.Tensor:
    """The classic distillation term, in fp32.

    `kind="kl"`: Hinton's T^2 * KL(softmax(parent / T) || softmax(child / T)); dense logits [B, C, H, W] (class
    dimension 1, e.g. semantic segmentation) are distilled per pixel. `"l1"` / `"mse"`: mean absolute / squared
    difference of the predictions, for regression outputs (e.g. optical flow) where there is no softmax.
    """
    if kind != "kl":
        diff = child_logits.float() - parent_logits.float()
        return diff.abs().mean() if kind == "l1" else diff.square().mean()
    if child_logits.ndim == 4:
        child_logits, parent_logits = child_logits.movedim(1, -1), parent_logits.movedim(1, -1)
    c = child_logits.float().flatten(0, -2) / temperature
    p = parent_logits.float().flatten(0, -2) / temperature
    return F.kl_div(F.log_softmax(c, -1), F.log_softmax(p, -1), reduction="batchmean", log_target=True) * temperature**2


def prediction(outputs: Any) -> torch.Tensor:
    """What a model predicts: its `logits`, or else its first tensor output besides the loss (`predicted_flow`...)."""
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    for key, value in outputs.items():
        if key != "loss" and isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"Cannot find the prediction in {type(outputs).__name__} (fields {list(outputs.keys())}) for KD.")


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without labels, for passes whose loss is computed here rather than by the model."""
    return {k: v for k, v in inputs.items() if k != "labels"}


def head_replay_possible(carriers: list[CarrierPair], parent: nn.Module, child: nn.Module) -> bool:
    """True when the only carrier is the input of both classification heads, so the heads alone can be replayed."""
    if len(carriers) != 1 or not (is_classifier(parent) and is_classifier(child)):
        return False
    (pair,) = carriers
    return (
        pair.parent.where == pair.child.where == "input"
        and pair.parent.module == find_head(parent, "parent")
        and pair.child.module == find_head(child, "child")
    )


@torch.no_grad()
def probe(
    parent: nn.Module, child: nn.Module, carriers: list[CarrierPair], inputs: dict[str, Any], replay: bool
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], bool]:
    """Per-sample carrier shapes of parent and child on one batch, in eval mode (no batch-norm update).

    Also confirms that replaying a head on its captured input gives the model's logits; if it does not (the model
    post-processes its head output), the caller must use full passes instead.
    """
    shapes, replay_ok = [], replay
    for model, specs, role in ((parent, [c.parent for c in carriers], "parent"),
                               (child, [c.child for c in carriers], "child")):
        modes = {module: module.training for module in model.modules()}  # per module: keeps a train-bn parent
        model.eval()
        try:
            with FeatureExtractor(model, specs, role=role) as ext:
                out = model(**model_inputs(inputs))
            if replay_ok:
                head = model.get_submodule(specs[0].module)
                replay_ok = torch.allclose(head(ext.features[0]).float(), out.logits.float(), atol=1e-5, rtol=1e-4)
        finally:
            for module, training in modes.items():
                module.training = training
        missing = [str(specs[i]) for i in range(len(specs)) if i not in ext.features]
        if missing:
            raise ValueError(f"The {role} forward pass never ran carrier module(s) {missing}; pick modules it uses.")
        shapes.append([tuple(ext.features[i].shape[1:]) for i in range(len(specs))])
    return shapes[0], shapes[1], replay_ok


class NonFiniteLossError(FloatingPointError):
    """A loss part or carrier feature became NaN or inf; the message names which."""


def describe_nonfinite(parts: dict[str, torch.Tensor], q: dict[int, torch.Tensor],
                       gates: dict[int, GateOutput], carriers: list[CarrierPair]) -> str:
    bad = [f"loss part '{name}'" for name, value in parts.items() if not torch.isfinite(value).all()]
    for i, carrier in enumerate(carriers):
        if not torch.isfinite(q[i]).all():
            bad.append(f"child feature of carrier '{carrier}'")
        if i in gates and not torch.isfinite(gates[i].mixed).all():
            bad.append(f"mixed feature of carrier '{carrier}'")
    return "non-finite values (NaN or inf) in " + ", ".join(bad)


class HKTObjective:
    """Computes one training step's HKT loss; holds the frozen parent and the run's settings."""

    def __init__(self, parent: nn.Module, carriers: list[CarrierPair], args: Any, replay: bool):
        self.parent = parent
        self.carriers = carriers
        self.args = args
        self.replay = replay

    def __call__(self, child: nn.Module, adapter: HKTAdapter, inputs: dict[str, Any], native: NativeLoss) -> StepResult:
        """`native(inputs)` is the Trainer's own loss of the child on the batch."""
        if "labels" not in inputs:
            raise ValueError("HKT needs labels in every training batch: each of its loss terms uses the ground truth.")
        with FeatureExtractor(child, [c.child for c in self.carriers], role="child") as ext:
            native_loss, outputs = native(inputs)
        q = ext.features
        step = self._replay_heads if self.replay else self._truncated_passes
        mixed_loss, parent_loss, parent_logits, gates = step(child, adapter, inputs, q)
        w0, w1, w2 = self.args.hkt_loss_weights
        parts = {"native": native_loss.float(), "child_mixed": mixed_loss.float(), "parent_head": parent_loss.float()}
        loss = w0 * parts["native"] + w1 * parts["child_mixed"] + w2 * parts["parent_head"]
        if self.args.hkt_kd_weight > 0:
            if parent_logits is None:
                with torch.no_grad():
                    parent_logits = prediction(self.parent(**model_inputs(inputs)))
            parts["kd"] = kd_loss(prediction(outputs), parent_logits, self.args.hkt_kd_temperature, self.args.hkt_kd_loss)
            loss = loss + self.args.hkt_kd_weight * parts["kd"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(describe_nonfinite(parts, q, gates, self.carriers))
        return StepResult(loss, outputs, parts, {str(c): gates[i] for i, c in enumerate(self.carriers)})

    def _replay_heads(self, child, adapter, inputs, q):
        pair = self.carriers[0]
        with torch.no_grad(), FeatureExtractor(self.parent, [pair.parent], role="parent") as pext:
            parent_out = self.parent(**model_inputs(inputs))
        h = pext.features[0]
        gate = adapter.mix(0, q[0], h)
        labels = inputs["labels"]
        child_head = child.get_submodule(pair.child.module)
        parent_head = self.parent.get_submodule(pair.parent.module)
        mixed_loss = classification_loss(child, child_head(gate.mixed.to(q[0].dtype)), labels)
        parent_loss = classification_loss(self.parent, parent_head(adapter.into_parent(0, gate.mixed, h.dtype)), labels)
        return mixed_loss, parent_loss, parent_out.logits, {0: gate}

    def _truncated_passes(self, child, adapter, inputs, q):
        gates: dict[int, GateOutput] = {}
        parent_features: dict[int, torch.Tensor] = {}

        def into_parent(i: int, h: torch.Tensor) -> torch.Tensor:
            gates[i] = adapter.mix(i, q[i], h)
            parent_features[i] = h
            return adapter.into_parent(i, gates[i].mixed, h.dtype)

        replaced = False

        def into_child(i: int, feature: torch.Tensor) -> torch.Tensor:
            # Up to the first replacement the pass equals the plain one, so that carrier reuses m (whose q carries the
            # graph); later carriers mix the feature as changed by the mixing upstream, as on the parent side.
            nonlocal replaced
            if not replaced:
                replaced = True
                return gates[i].mixed.to(feature.dtype)
            return adapter.mix(i, feature, parent_features[i]).mixed.to(feature.dtype)

        specs = [c.parent for c in self.carriers]
        with torch.no_grad(), FeatureExtractor(self.parent, specs, into_parent, grad_after_replace=True, role="parent"):
            parent_out = self.parent(**inputs)
        specs = [c.child for c in self.carriers]
        with torch.no_grad(), FeatureExtractor(child, specs, into_child, grad_after_replace=True, role="child"):
            child_out = child(**inputs)
        for role, out in (("parent", parent_out), ("child", child_out)):
            if getattr(out, "loss", None) is None:
                raise ValueError(f"The {role} returned no loss for a batch with labels; HKT needs a task loss.")
        return child_out.loss, parent_out.loss, None, gates
