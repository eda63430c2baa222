"""The HKT training objective for one batch: the parent's pass, the child's pass, and the loss terms.

    L = w0 * L_c   (the child's own task loss: the Trainer's compute_loss, or the same from its replayed LM head)
      + w1 * L_c*  (the child's task loss with its carrier feature replaced by m)
      + w2 * L_p*  (the frozen parent's task loss with its carrier feature replaced by m, mapped into its space)
      + kd * KD    (optional classic distillation on the predictions)
      + hint * H   (optional hint, FitNets: MSE(T'(q), h) at every carrier, a mean over items as every term)

Passes. The parent's plain pass runs first, without autograd; one such pass serves KD and the HKT terms. When the
single carrier is the input of both prediction heads (classification heads, or language-model heads found with
`get_output_embeddings()`), L_c* and L_p* replay just the heads on m. For carriers elsewhere, L_p* needs the parent
downstream of m: that pass (no graph upstream of its carriers) follows the child's, and replaces the plain parent
pass unless KD needs the parent's own prediction; L_c* runs a second, equally truncated child pass. A term whose
weight is 0 is not computed. Every pass but the Trainer's own runs without a KV cache (packed, padding-free batches
stay separate sequences), and only each model's first pass of a batch updates its batch-norm statistics.

Positions and normalisation. Gates mix only real positions (the batch's attention mask for token features) and
their statistics average over those. Every term is first a mean over this batch's items: labels that are not -100
(after the causal shift for causal LMs, as transformers' ForCausalLMLoss). Given `num_items_in_batch` (the item
count of the whole accumulated batch, as the Trainer computes it), the terms are rescaled to sum / num_items_in_batch,
the Trainer's own normalisation, so gradient accumulation over padded batches gives the update of one big batch.
Where the Trainer's loss is a mean over each batch (no `num_items_in_batch`, or a model whose loss ignores it, such
as BERT's classifiers), every term is that mean too, and the Trainer's own scaling (its division by the accumulation
steps, or none) applies to all of them alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .adapter import HKTAdapter
from .carriers import CarrierPair
from .extraction import FeatureExtractor, FeatureSpec, resolve_module
from .losses import (
    IGNORE_INDEX,
    count_items,
    head_loss,
    item_mean,
    kd_loss,
    target_labels,
    target_mask,
    token_loss_sum,
)
from .mixture import GateOutput, masked_mean
from .model_state import base_of, running_stats_kept
from .parent import shared_vocabulary
from .passes import forward_inputs, model_label_names, without_cache
from .tasks import reads_last_token, task_of
from .training_args import ObjectiveSettings
from .transfer import match_size

NativeLoss = Callable[[dict[str, Any]], tuple[torch.Tensor, Any]]


@dataclass
class StepResult:
    """One batch's objective. `loss` is what to backpropagate (rescaled by `num_items_in_batch` when given); `parts`
    are the unweighted terms as means over this batch's items, and `stats` the gate statistics, both for logs."""

    loss: torch.Tensor
    outputs: Any
    parts: dict[str, torch.Tensor]
    gates: dict[str, GateOutput] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def logs(self) -> dict[str, torch.Tensor]:
        """Everything to log for this batch, under its log name (`hkt/loss_native`, `hkt/<carrier>/gate_mean`...)."""
        return {**{f"hkt/loss_{name}": value.detach() for name, value in self.parts.items()}, **self.stats}


# ---- passes ----------------------------------------------------------------------------------------------------------


def prediction(outputs: Any) -> torch.Tensor:
    """What a model predicts: its `logits`; extractive QA's start and end logits as [B, 2, N] (two distributions over
    the positions); or else its first tensor output besides the loss (`predicted_flow`...)."""
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if getattr(outputs, "start_logits", None) is not None and getattr(outputs, "end_logits", None) is not None:
        return torch.stack((outputs.start_logits, outputs.end_logits), 1)
    for key, value in outputs.items():
        if key != "loss" and isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"Cannot find the prediction in {type(outputs).__name__} (fields {list(outputs.keys())}) for KD.")


# ---- gates on real positions -----------------------------------------------------------------------------------------


def on_decoder(model: nn.Module, spec: FeatureSpec) -> bool:
    """Whether a carrier of an encoder-decoder model lies on the decoder side (anything not under an `encoder`)."""
    return bool(getattr(base_of(model).config, "is_encoder_decoder", False)) and "encoder" not in spec.module.split(".")


def real_positions(model: nn.Module, spec: FeatureSpec, inputs: dict[str, Any], feature: torch.Tensor
                   ) -> torch.Tensor | None:
    """[B, N] mask of the real (non-padding) tokens of a token feature: the batch's attention mask (the decoder's, or
    its labels, on the decoder side of an encoder-decoder) when its shape fits; None for other features."""
    if feature.ndim != 3:
        return None
    if on_decoder(model, spec):
        mask = inputs.get("decoder_attention_mask")
        labels = inputs.get("labels")
        mask = mask if mask is not None or labels is None else labels.ne(IGNORE_INDEX)
    else:
        mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None and tuple(mask.shape) == tuple(feature.shape[:2]) else None


def head_token(model: nn.Module, inputs: dict[str, Any], feature: torch.Tensor) -> torch.Tensor:
    """[B] index of the token a sequence classifier reads in a token feature [B, N, D]: the last non-padding token
    for decoder-only models (from `pad_token_id`, as transformers finds it), else the first (BERT's pooler, RoBERTa's
    classification head)."""
    batch, length = feature.shape[:2]
    if not reads_last_token(model):
        return torch.zeros(batch, dtype=torch.long, device=feature.device)
    input_ids, pad = inputs.get("input_ids"), getattr(base_of(model).config, "pad_token_id", None)
    if input_ids is None or pad is None or tuple(input_ids.shape) != (batch, length):
        return torch.full((batch,), length - 1, dtype=torch.long, device=feature.device)
    positions = torch.arange(length, device=input_ids.device)
    return (positions * input_ids.ne(pad).int()).argmax(-1)


def gate_stats(name: str, gate: GateOutput, mask: torch.Tensor | None, head_index: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    """Logged statistics of one carrier's gate over real positions, plus the gate at the head's token if given."""
    stats = {f"hkt/{name}/gate_mean": masked_mean(gate.gate.detach(), mask),
             f"hkt/{name}/mix_weight_mean": masked_mean(gate.weight.detach(), mask)}
    if head_index is not None:
        rows = torch.arange(gate.gate.shape[0], device=gate.gate.device)
        stats[f"hkt/{name}/gate_at_head_token"] = gate.gate.detach()[rows, head_index].float().mean()
    return stats


def check_targets(inputs: dict[str, Any], label_names: Sequence[str]) -> None:
    """Refuse a batch without the targets that every HKT term needs."""
    missing = [name for name in label_names if name not in inputs]
    if missing:
        raise ValueError(
            f"HKT needs the targets {list(label_names)} in every training batch (missing: {missing}): each of its loss "
            "terms uses the ground truth. Check the collator and `remove_unused_columns`, or set "
            "`label_names` in the training arguments to the names of the batch's targets."
        )


class NonFiniteLossError(FloatingPointError):
    """A loss part or carrier feature became NaN or inf; the message names which."""


def describe_nonfinite(parts: dict[str, torch.Tensor], q: dict[int, torch.Tensor], h: dict[int, torch.Tensor],
                       gates: dict[int, GateOutput], carriers: list[CarrierPair]) -> str:
    """Which loss parts and features are NaN/inf; a bad parent feature is named as the parent's, so the error points
    at the parent rather than at the child's learning rate."""
    bad = [f"loss part '{name}'" for name, value in parts.items() if not torch.isfinite(value).all()]
    for i, carrier in enumerate(carriers):
        if i in h and not torch.isfinite(h[i]).all():
            bad.append(f"the PARENT's feature of carrier '{carrier}' (the parent produced it: check the parent)")
        if i in q and not torch.isfinite(q[i]).all():
            bad.append(f"child feature of carrier '{carrier}'")
        if i in gates and not torch.isfinite(gates[i].mixed).all():
            bad.append(f"mixed feature of carrier '{carrier}'")
    return "non-finite values (NaN or inf) in " + ", ".join(bad)


# ---- the objective ---------------------------------------------------------------------------------------------------


class HKTObjective:
    """Computes one training step's HKT loss; holds the frozen parent and the run's settings.

    `settings` are the run's `ObjectiveSettings` (`HKTTrainingArguments.objective_settings()`).
    """

    def __init__(self, parent: nn.Module, carriers: list[CarrierPair], settings: ObjectiveSettings, replay: bool,
                 native_replay: bool = False):
        self.parent = parent
        self.carriers = carriers
        self.settings = settings
        self.replay = replay
        # The native term from the child's head replayed on its input in chunks, instead of the model's own loss
        # (which keeps [positions, vocabulary] log-probabilities for backward); only where the trainer has checked
        # that the two are the same loss (`own_loss_replayable`, no label smoothing or custom loss function).
        self.native_replay = native_replay
        # Whether the Trainer's loss for the child is a mean over each batch although the Trainer passes it
        # `num_items_in_batch` (a model whose loss ignores the count); set by the trainer on the first step.
        self.native_is_mean: bool | None = None
        self.grad_path_checked = False  # the child's carriers are checked for a gradient path in the first step

    @property
    def weights(self) -> tuple[float, float, float]:
        return self.settings.loss_weights

    def __call__(
        self, child: nn.Module, adapter: HKTAdapter, inputs: dict[str, Any], native: NativeLoss,
        num_items_in_batch: torch.Tensor | int | None = None, *, mean_factor: float = 1.0,
        label_names: Sequence[str] | None = None,
    ) -> StepResult:
        """`native(inputs) -> (loss, outputs)` is the Trainer's own loss on the child: the summed loss over
        `num_items_in_batch` when that is given, else a mean over this batch times `mean_factor` (see `_combine`).
        `label_names` are the batch's targets (the Trainer's `label_names`; by default the child's own)."""
        label_names = list(label_names) if label_names else model_label_names(child)
        if "labels" in label_names and (inputs.get("labels") is None or count_items(child, inputs["labels"]) == 0):
            return self._without_items(inputs, native, label_names)
        check_targets(inputs, label_names)
        _, w1, w2 = self.weights
        kd, hint = self.settings.kd_weight > 0, self.settings.hint_weight > 0
        mixing = w1 > 0 or w2 > 0
        parent_out, h = None, {}
        plain_parent = kd or hint or (mixing and (self.replay or w2 == 0))
        if plain_parent:  # the plain parent pass, first
            parent_out, h = self._parent_pass(inputs, capture=mixing or hint, label_names=label_names)
        # Without HKT terms, KD or hint the step is the Trainer's own, bit for bit.
        native_replay = self.native_replay and (mixing or kd or hint)
        specs = [c.child for c in self.carriers] if mixing or native_replay or hint else []
        check = torch.is_grad_enabled() and not self.grad_path_checked
        self.grad_path_checked |= check
        with FeatureExtractor(child, specs, role="child", check_grad_path=check) as ext:
            if native_replay:
                outputs = child(**forward_inputs(child, inputs, label_names))
            else:
                native_loss, outputs = native(dict(inputs))
        q = ext.features
        if native_replay:
            native_loss = self._replayed_native(child, inputs, q[0], num_items_in_batch, mean_factor)
        terms, gates = {}, {}
        if self.replay and mixing:
            terms, gates = self._replay_heads(child, adapter, inputs, q, h)
        elif mixing:
            terms, gates = self._truncated_passes(child, adapter, inputs, q, h, parent_counted=plain_parent)
        if kd:
            terms["kd"] = kd_loss(*shared_vocabulary(prediction(outputs), prediction(parent_out)),
                                  self.settings.kd_temperature, self.settings.kd_loss,
                                  target_mask(child, inputs.get("labels")))
        if hint:
            terms["hint"] = self._hint(child, adapter, inputs, q, h)
        result = self._combine(child, inputs, native_loss, outputs, terms, num_items_in_batch, mean_factor)
        result.gates = {str(c): gates[i] for i, c in enumerate(self.carriers) if i in gates}
        result.stats = self._stats(child, inputs, q, gates)
        if not torch.isfinite(result.loss):
            raise NonFiniteLossError(describe_nonfinite(result.parts, q, h, gates, self.carriers))
        return result

    @staticmethod
    def _without_items(inputs: dict[str, Any], native: NativeLoss, label_names: Sequence[str]) -> StepResult:
        """A batch without labels, or whose labels are all -100 (or with no rows): the HKT terms, sums over its
        items, are 0, so the step is the plain Trainer's own (its loss, or its error, e.g. for a model that returns
        no loss without labels)."""
        loss, outputs = native(dict(inputs))
        check_targets({k: v for k, v in inputs.items() if v is not None}, label_names)
        return StepResult(loss, outputs, {"native": loss.detach().float()})

    def _combine(self, child: nn.Module, inputs: dict[str, Any], native_loss: torch.Tensor, outputs: Any,
                 terms: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None,
                 mean_factor: float = 1.0) -> StepResult:
        """Weighted sum of the terms, each normalised as the Trainer normalised the native loss, so their weights hold
        with and without gradient accumulation. With `num_items_in_batch`, the native loss is sum /
        num_items_in_batch and each other term (a mean over this batch's items) is rescaled to the same; without, the
        native loss is this batch's mean times `mean_factor` (the Trainer's factor for several processes), and so is
        each term. `parts` hold the means."""
        native_loss = native_loss.float()
        native_part, scale = native_loss / mean_factor, mean_factor
        if num_items_in_batch is not None:
            items = count_items(child, inputs["labels"]).to(native_loss.device)
            scale = items / num_items_in_batch
            native_part = native_loss * num_items_in_batch / items.clamp(min=1)
        weights = dict(zip(("child_mixed", "parent_head"), self.weights[1:]), kd=self.settings.kd_weight,
                       hint=self.settings.hint_weight)
        terms = {name: value.float() for name, value in terms.items()}
        loss = self.weights[0] * native_loss + scale * sum(weights[name] * value for name, value in terms.items())
        return StepResult(loss, outputs, {"native": native_part, **terms})

    def _replayed_native(self, child: nn.Module, inputs: dict[str, Any], q: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None, mean_factor: float = 1.0) -> torch.Tensor:
        """The child's own token loss from its head replayed on q, normalised as the Trainer's loss is: summed over
        `num_items_in_batch` when that is given, else a mean over the positions with a target (times
        `mean_factor`)."""
        head = resolve_module(child, self.carriers[0].child.module)
        total, count = token_loss_sum(head, q, target_labels(child, inputs["labels"]))
        if num_items_in_batch is not None:
            return total / num_items_in_batch
        return total / count.clamp(min=1) * mean_factor

    def _parent_pass(self, inputs: dict[str, Any], capture: bool, label_names: Sequence[str] | None = None
                     ) -> tuple[Any, dict[int, torch.Tensor]]:
        """The parent's plain pass without autograd (and without a cache); captures its carrier features when asked.
        A `train-bn` parent's batch-norm statistics count the batch here, once."""
        specs = [c.parent for c in self.carriers] if capture else []
        with torch.no_grad(), FeatureExtractor(self.parent, specs, role="parent") as ext:
            out = self.parent(**forward_inputs(self.parent, inputs, label_names))
        return out, ext.features

    def _mix(self, child: nn.Module, adapter: HKTAdapter, i: int, q: torch.Tensor, h: torch.Tensor,
             inputs: dict[str, Any]) -> GateOutput:
        """m for carrier i from the child feature q and the raw parent feature h, mixing real positions only."""
        carrier = self.carriers[i]
        p = match_size(adapter.to_child[i](h.to(q.dtype)), q, f"carrier '{carrier}'")
        return adapter.gates[i](q, p, real_positions(child, carrier.child, inputs, q))

    def _into_parent(self, adapter: HKTAdapter, i: int, mixed: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """m mapped into the parent's space, at the parent feature's size and dtype."""
        return match_size(adapter.into_parent(i, mixed, h.dtype), h, f"carrier '{self.carriers[i]}'")

    def _hint(self, child: nn.Module, adapter: HKTAdapter, inputs: dict[str, Any], q: dict[int, torch.Tensor],
              h: dict[int, torch.Tensor]) -> torch.Tensor:
        """The hint term: per carrier, the squared error between the child's feature mapped into the parent's space
        and the parent's, averaged over channels, then over this batch's items (`item_mean`); the mean over
        carriers."""
        targets = target_mask(child, inputs.get("labels"))
        errors = []
        for i, carrier in enumerate(self.carriers):
            mapped = self._into_parent(adapter, i, q[i], h[i])
            error = (mapped.float() - h[i].float()).pow(2).mean(1 if mapped.ndim == 4 else -1)
            errors.append(item_mean(error, targets, real_positions(child, carrier.child, inputs, q[i])))
        return torch.stack(errors).mean()

    def _stats(self, child: nn.Module, inputs: dict[str, Any], q: dict[int, torch.Tensor],
               gates: dict[int, GateOutput]) -> dict[str, torch.Tensor]:
        stats = {}
        for i, gate in gates.items():
            spec = self.carriers[i].child
            mask = real_positions(child, spec, inputs, q[i])
            reads_one = task_of(child) == "text-classification" and q[i].ndim == 3
            index = head_token(child, inputs, q[i]) if reads_one else None
            stats.update(gate_stats(str(self.carriers[i]), gate, mask, index))
        return stats

    def _replay_heads(self, child, adapter, inputs, q, h):
        """L_c* and L_p* from the two heads replayed on m (the carrier is the input of both heads)."""
        _, w1, w2 = self.weights
        pair = self.carriers[0]
        gate = self._mix(child, adapter, 0, q[0], h[0], inputs)
        terms = {}
        if w1 > 0:
            terms["child_mixed"] = head_loss(child, resolve_module(child, pair.child.module), gate.mixed.to(q[0].dtype),
                                             inputs)
        if w2 > 0:
            terms["parent_head"] = head_loss(self.parent, resolve_module(self.parent, pair.parent.module),
                                             self._into_parent(adapter, 0, gate.mixed, h[0]), inputs)
        return terms, {0: gate}

    def _truncated_passes(self, child, adapter, inputs, q, h, parent_counted: bool):
        """L_p* from the parent's pass downstream of m (it captures the parent features itself), L_c* from a child
        pass downstream of m; each records a graph only after its first replaced carrier, and runs without a cache.

        Batch-norm statistics count each batch once per model: the child's in its native pass (its mixed pass keeps
        them), a `train-bn` parent's in its first pass of the step: the plain pass when there is one
        (`parent_counted`), else this truncated pass, which, like the reference code's single hooked parent pass,
        normalises downstream of m with m's statistics."""
        _, w1, w2 = self.weights
        gates: dict[int, GateOutput] = {}
        parent_features = dict(h)
        terms = {}
        if w2 > 0:
            def into_parent(i: int, feature: torch.Tensor) -> torch.Tensor:
                gates[i] = self._mix(child, adapter, i, q[i], feature, inputs)
                parent_features[i] = feature
                return self._into_parent(adapter, i, gates[i].mixed, feature)

            specs = [c.parent for c in self.carriers]
            keep_stats = running_stats_kept(self.parent) if parent_counted else nullcontext()
            with torch.no_grad(), keep_stats, FeatureExtractor(self.parent, specs, into_parent,
                                                               grad_after_replace=True, role="parent"):
                terms["parent_head"] = model_loss(self.parent(**without_cache(self.parent, inputs)), "parent")
        else:
            gates = {i: self._mix(child, adapter, i, q[i], h[i], inputs) for i in range(len(self.carriers))}
        if w1 > 0:
            terms["child_mixed"] = self._child_mixed_pass(child, adapter, inputs, gates, parent_features)
        return terms, gates

    def _child_mixed_pass(self, child, adapter, inputs, gates, parent_features) -> torch.Tensor:
        replaced = False

        def into_child(i: int, feature: torch.Tensor) -> torch.Tensor:
            # Up to the first replacement the pass equals the plain one, so that carrier reuses m (whose q carries the
            # graph); later carriers mix the feature as changed by the mixing upstream, as on the parent side.
            nonlocal replaced
            if not replaced:
                replaced = True
                return gates[i].mixed.to(feature.dtype)
            return self._mix(child, adapter, i, feature, parent_features[i], inputs).mixed.to(feature.dtype)

        specs = [c.child for c in self.carriers]
        with torch.no_grad(), running_stats_kept(child), FeatureExtractor(child, specs, into_child,
                                                                            grad_after_replace=True, role="child"):
            return model_loss(child(**without_cache(child, inputs)), "child")


def model_loss(outputs: Any, role: str) -> torch.Tensor:
    """The task loss a model returned for a batch with labels (a mean over its items)."""
    if getattr(outputs, "loss", None) is None:
        raise ValueError(f"The {role} returned no loss for a batch with labels; HKT needs a task loss.")
    return outputs.loss
