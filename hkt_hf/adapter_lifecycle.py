"""The HKT adapter over a trainer's life, always before any optimizer exists.

It is built from one probe of the first training batch: when the trainer is made, or at the start of `train()` when no
training set was given yet; a later `train()` re-attaches it (the Trainer keeps its optimizer between calls); each
child that `model_init` makes for a `train()` gets carriers and an adapter of its own. So the Trainer's optimizer,
`optimizer_cls_and_kwargs`, DeepSpeed's and one made over `trainer.model.parameters()` after the trainer all hold it.
Only an optimizer made before the trainer (`optimizers=(optimizer, lr_scheduler)`) can lack it: without a scheduler
its parameters are added as a group of their own with the optimizer's defaults (the Trainer builds its scheduler
later, over every group); with a scheduler, built without that group, it is refused (`include_adapter`).

`AdapterLifecycle` is the base of `HKTTrainer` that does this; it uses what `HKTTrainer.__init__` sets (`parent_model`,
`carriers`, `hkt_lineage`); `HKTTrainer.train` detaches the adapter when a run ends.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import send_to_device
from torch import nn
from transformers.utils import logging

from .adapter import HKTAdapter, inject_adapter, load_adapter_state, remove_adapter
from .carriers import CarrierPair, resolve_carriers
from .model_state import base_of
from .objective import HKTObjective
from .parent import check_compatible, check_vocabularies
from .probing import head_replay_possible, own_loss_replayable, probe
from .compat import ResumeWithWeightConversion

logger = logging.get_logger(__name__)

EMPTY_DATASET = "The training dataset is empty; HKT needs labelled training examples."


def missing_parameters(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[nn.Parameter]:
    """`module`'s trainable parameters that no group of `optimizer` holds."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in held]


def include_adapter(optimizer: torch.optim.Optimizer, lr_scheduler: Any, adapter: nn.Module) -> int:
    """Add the adapter's trainable parameters that a user's `optimizer` lacks as a group of their own; refuse when a
    user's `lr_scheduler` exists (its base learning rates would miss the group). Returns how many were added."""
    missing = missing_parameters(optimizer, adapter)
    if missing and lr_scheduler is not None:
        raise ValueError(
            f"The optimizer given in `optimizers=(optimizer, lr_scheduler)` lacks the {len(missing)} trainable HKT "
            "adapter parameters (aligners, learned gates), and its scheduler was built without them. Either pass "
            "`optimizers=(optimizer, None)` (HKTTrainer adds them as a parameter group with the optimizer's defaults; "
            "the Trainer builds the scheduler from lr_scheduler_type), or `optimizer_cls_and_kwargs=(optimizer_class, "
            "kwargs)`, or create the trainer first, then the optimizer and scheduler over `trainer.model.parameters()` "
            "(which then include `hkt_adapter`), and set `trainer.optimizer` and `trainer.lr_scheduler`."
        )
    if missing:
        optimizer.add_param_group({"params": missing})
    return len(missing)


class AdapterLifecycle(ResumeWithWeightConversion):
    """Gives each child its HKT adapter before any optimizer exists (see the module's docstring)."""

    hkt_adapter: HKTAdapter | None = None
    _objective: HKTObjective | None = None
    _resume_adapter_from: str | None = None  # set by `train()` for a `model_init` child built inside `Trainer.train`

    def _carriers_for(self, parent: nn.Module, child: nn.Module) -> list[CarrierPair]:
        """The carriers between `parent` and `child`, once the parent is known to be able to teach this child."""
        check_compatible(parent, child)
        check_vocabularies(parent, child, self.processing_class, self.parent_source, self.args.hkt_parent_revision)
        return resolve_carriers(self.args.hkt_carriers, parent, child)

    def _tag(self, child: nn.Module) -> None:
        if hasattr(child, "add_model_tags"):
            child.add_model_tags(self._tag_names)

    def _build_adapter(self, child: nn.Module) -> HKTAdapter:
        """Build the adapter for `child` from the carrier shapes of one probe of the first training batch, attach it
        (so that every optimizer made from now on sees its parameters) and make the step's objective.

        The batch is drawn, and the aligners initialised, each on a fork of the random state: the aligners start from
        the state the trainer was made in, and training draws what the plain Trainer draws (dropout, augmentation)."""
        with self._forked_rng():
            inputs = send_to_device(self._first_batch(), self.args.device)
        replay = head_replay_possible(self.carriers, self.parent_model, child)
        with self.accelerator.autocast():  # as the training step runs
            parent_shapes, child_shapes, replay = probe(self.parent_model, child, self.carriers, inputs, replay)
        native_replay = (  # the native term from the replayed head only where it is the Trainer's own loss
            replay and self.label_smoother is None and self.compute_loss_func is None
            and self.model_accepts_loss_kwargs and own_loss_replayable(child, self.carriers[0].child, inputs)
        )
        with self._forked_rng():
            adapter = HKTAdapter(self.carriers, parent_shapes, child_shapes, self.args.hkt_gate, self.args.hkt_lambda)
        adapter.to(device=self.args.device, dtype=next(child.parameters()).dtype)
        inject_adapter(child, adapter)
        self.hkt_adapter = adapter
        self._objective = HKTObjective(self.parent_model, self.carriers, self.args.objective_settings(), replay,
                                       native_replay)
        return adapter

    def _forked_rng(self) -> AbstractContextManager:
        """torch's random state (and the run's GPU's) restored when the block ends."""
        return torch.random.fork_rng(devices=[self.args.device] if self.args.device.type == "cuda" else [])

    def _check_not_empty(self) -> None:
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise ValueError(EMPTY_DATASET)

    def _first_batch(self) -> dict[str, Any]:
        self._check_not_empty()
        batch = next(iter(self.get_train_dataloader()), None)
        if batch is None:  # an iterable dataset without examples
            raise ValueError(EMPTY_DATASET)
        return batch

    def _include_adapter_in_optimizer(self) -> None:
        """A user's optimizer, made before the adapter and not yet prepared by Accelerate, gets its parameters."""
        if self.hkt_adapter is None or self.optimizer is None or isinstance(self.optimizer, AcceleratedOptimizer):
            return
        if added := include_adapter(self.optimizer, self.lr_scheduler, self.hkt_adapter):
            logger.info(f"Added the {added} trainable HKT adapter parameters to the user's optimizer as a new group.")

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """`Trainer.call_model_init`; a child made for a `train()` run gets its own carriers and adapter here, before
        the Trainer makes its optimizer (and, on a resume, the checkpoint's adapter state)."""
        child = super().call_model_init(trial)
        if "parent_model" not in self.__dict__:  # from Trainer.__init__: HKTTrainer.__init__ builds the adapter
            return child
        if self.place_model_on_device:  # the Trainer moves it next (not a model-parallel one); the probe needs it now
            child = child.to(self.args.device)
        remove_adapter(self.model)
        self.carriers = self._carriers_for(self.parent_model, child)
        self.hkt_lineage.update(hkt_carriers=[str(c) for c in self.carriers],
                                child_architecture=type(base_of(child)).__name__)
        self._tag(child)
        self._load_adapter_state(self._build_adapter(child))
        return child

    def _load_adapter_state(self, adapter: HKTAdapter) -> None:
        if self._resume_adapter_from is not None:
            load_adapter_state(adapter, self._resume_adapter_from)

    def _attach_adapter(self) -> None:
        """The run's adapter on the child: the one built for it (by `__init__` or a previous `train()`, which the
        Trainer's optimizer, kept between calls, holds), else built now."""
        if self.hkt_adapter is None:
            self._build_adapter(self.model)
        else:
            inject_adapter(self.model, self.hkt_adapter)
        self._load_adapter_state(self.hkt_adapter)
        self._include_adapter_in_optimizer()

    def _step_adapter(self) -> HKTAdapter:
        if self.hkt_adapter is None:
            raise RuntimeError(
                "HKTTrainer.compute_loss in training mode needs the HKT adapter, built from the first training batch "
                "before any optimizer: pass train_dataset to HKTTrainer(...), or call trainer.train()."
            )
        return self.hkt_adapter
