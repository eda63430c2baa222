"""What one batch tells before training: the carriers' feature shapes, and which terms can be computed from replayed
heads (the heads replayed on their captured inputs give the models' logits; the child's own loss is the cross-entropy
of its replayed head). The trainer asks once, when it builds the adapter; the answers choose the passes of
`HKTObjective`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .carriers import CarrierPair, head_carrier
from .extraction import FeatureExtractor, FeatureSpec, resolve_module
from .losses import head_prediction, target_labels, token_loss
from .model_state import in_eval_mode
from .objective import prediction
from .passes import forward_inputs
from .tasks import QA_TASK, SEQUENCE_TASKS, TOKEN_TASKS, loss_task

# Tasks whose heads can be replayed on m: per token, per sample, extractive QA.
REPLAYABLE_TASKS = TOKEN_TASKS | SEQUENCE_TASKS | {QA_TASK}


def head_replay_possible(carriers: list[CarrierPair], parent: nn.Module, child: nn.Module) -> bool:
    """True when the only carrier is the input of both prediction heads of two models of the same (classification
    or token) task, so replaying the heads on m gives L_c* and L_p*."""
    task = loss_task(child)
    if len(carriers) != 1 or task not in REPLAYABLE_TASKS or loss_task(parent) != task:
        return False
    try:
        return carriers[0] == head_carrier(parent, child)
    except ValueError:
        return False


@torch.no_grad()
def probe(
    parent: nn.Module, child: nn.Module, carriers: list[CarrierPair], inputs: dict[str, Any], replay: bool
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], bool]:
    """Per-sample carrier shapes of parent and child on one batch, in eval mode (no batch-norm update).

    Also confirms that replaying a head on its captured input gives the model's logits; if it does not (the model
    post-processes its head output, e.g. picks one token's logits), the caller must use full passes instead.
    The child runs first: a batch it cannot take (e.g. an empty one) fails with the error the plain Trainer gives.
    """
    shapes, replay_ok = {}, replay
    for model, specs, role in ((child, [c.child for c in carriers], "child"),
                               (parent, [c.parent for c in carriers], "parent")):
        with in_eval_mode(model):
            with FeatureExtractor(model, specs, role=role) as ext:
                out = model(**forward_inputs(model, inputs))
            if replay_ok and 0 in ext.features:  # the head replayed after the pass, which must run it once
                head = resolve_module(model, specs[0].module)
                replayed, logits = head_prediction(model, head(ext.features[0])).float(), prediction(out).float()
                replay_ok = replayed.shape == logits.shape and torch.allclose(replayed, logits, atol=1e-5, rtol=1e-4)
        missing = [str(specs[i]) for i in range(len(specs)) if i not in ext.features]
        if missing:
            raise ValueError(f"The {role} forward pass never ran carrier module(s) {missing}; pick modules it uses.")
        shapes[role] = [tuple(ext.features[i].shape[1:]) for i in range(len(specs))]
    return shapes["parent"], shapes["child"], replay_ok


@torch.no_grad()
def own_loss_replayable(child: nn.Module, head: FeatureSpec, inputs: dict[str, Any]) -> bool:
    """Whether the child's own loss on `inputs` is the token cross-entropy of its head replayed on the head's input
    (no auxiliary terms, no post-processing), so the native term can be computed from that input in chunks."""
    if loss_task(child) not in TOKEN_TASKS or inputs.get("labels") is None:
        return False
    with in_eval_mode(child):
        with FeatureExtractor(child, [head], role="child") as ext:
            out = child(**forward_inputs(child, inputs), labels=inputs["labels"])
        replayed = token_loss(resolve_module(child, head.module), ext.features[0],
                              target_labels(child, inputs["labels"]))
    own = getattr(out, "loss", None)
    return own is not None and torch.allclose(replayed, own.float(), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def loss_ignores_item_count(native: Callable[[int | torch.Tensor], torch.Tensor], child: nn.Module,
                            num_items_in_batch: int | torch.Tensor) -> bool:
    """Whether the Trainer's loss `native(num_items_in_batch)` on one batch is a mean over that batch although the
    Trainer passes the count (a forward taking `**kwargs` whose loss does not use them, e.g. BERT's classifiers): the
    same loss for twice the count. The Trainer then neither divides by the count nor by the accumulation steps."""
    with in_eval_mode(child):
        once, twice = (native(count).float() for count in (num_items_in_batch, 2 * num_items_in_batch))
    return bool(torch.allclose(once, twice, rtol=1e-5, atol=0))
