"""`HKTTrainer`: transformers' Trainer with Hereditary Knowledge Transfer from a frozen parent.

Swap `Trainer` for `HKTTrainer` and `TrainingArguments` for `HKTTrainingArguments`, name a parent, and the child
trains with the HKT objective (see `objective.py`). Evaluation, prediction and `save_model` see the child alone.
Only public Trainer hooks are overridden (`train`, `compute_loss`, `log`, `save_model`, `create_model_card`); the one
workaround for a transformers bug lives in `transformers_workarounds.py`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import send_to_device
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer
from transformers.utils import logging

from .adapter import HKTAdapter, get_adapter, inject_adapter, load_adapter_state, remove_adapter, save_adapter_state
from .carriers import CarrierPair, resolve_carriers
from .checkpointing import CheckpointCommitCallback, resolve_resume_checkpoint
from .extraction import base_of
from .lineage import lineage_record, write_lineage
from .model_card import TAGS, add_lineage_to_card
from .objective import HKTObjective, NonFiniteLossError, StepResult
from .parent import check_compatible, check_finite_weights, frozen, load_parent
from .probing import head_replay_possible, own_loss_replayable, probe
from .sharding import place_parent, release_parent_leftovers
from .tasks import auto_class_for, task_of
from .training_args import HKTTrainingArguments
from .transformers_workarounds import ResumeWithWeightConversion

logger = logging.get_logger(__name__)

# A run whose skipped batches exceed this share of its steps has not trained: it fails instead of "succeeding".
MAX_SKIPPED_SHARE = 0.5
EMPTY_DATASET = "The training dataset is empty; HKT needs labelled training examples."


@contextmanager
def forward_replaced(module: nn.Module, fn: Callable[[], Any]) -> Iterator[None]:
    """While active, a call of `module` runs `fn()` in place of its forward (calls of `module` inside `fn` run its
    real forward), so a wrapper such as DDP sees all that `fn` computes as its forward pass."""
    own = module.__dict__.get("forward")  # an instance-level forward, e.g. Accelerate's autocast wrapper

    def restore() -> None:
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def run(*args: Any, **kwargs: Any) -> Any:
        restore()
        return fn()

    module.forward = run
    try:
        yield
    finally:
        restore()


def snapshot_buffers(*models: nn.Module) -> Callable[[], None]:
    """Snapshot the models' buffers (batch-norm statistics); the returned `restore()` puts them back, so a skipped
    batch leaves no trace in them."""
    saved = [(b, b.detach().clone()) for m in models for b in m.buffers()]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)

    return restore


class HKTTrainer(ResumeWithWeightConversion):
    """A drop-in `Trainer` whose training loss is the HKT objective.

    Args:
        parent_model: the parent, as a model or a path / Hub id; defaults to `args.hkt_parent`. A model object is
            left as it was given once training ends (mode, `requires_grad`, dtype, weights).
        Everything else is passed to `transformers.Trainer` unchanged.

    After `train()`, `trainer.hkt_adapter` holds the aligners and gates, detached from the child; a later `train()`
    call (a second run, or an in-process resume) trains the same adapter with the same optimizer.
    """

    _tag_names = TAGS
    _name = "HKT"
    _paper = {
        "title": "HKT: A Biologically Inspired Framework for Modular Hereditary Knowledge Transfer in Neural Networks",
        "id": "2508.09743",
    }

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: HKTTrainingArguments | None = None,
        *trainer_args: Any,
        parent_model: PreTrainedModel | nn.Module | str | None = None,
        **trainer_kwargs: Any,
    ):
        if args is not None and not isinstance(args, HKTTrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs HKTTrainingArguments, got {type(args).__name__}: replace "
                "`TrainingArguments(...)` with `HKTTrainingArguments(...)` (same fields, plus the hkt_* ones)."
            )
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        parent = self._load_parent(parent_model if parent_model is not None else self.args.hkt_parent)
        parent_name = parent_model if isinstance(parent_model, str) else self.args.hkt_parent
        if parent_name is None:
            parent_name = getattr(getattr(base_of(parent), "config", None), "_name_or_path", None) or None
        self.parent_name = parent_name or type(base_of(parent)).__name__
        check_finite_weights(parent, self.parent_name)
        self.carriers = self._carriers_for(parent, self.model)
        # Under ZeRO-3 `parent_engine` owns the parent's partitions and gather hooks; None otherwise.
        self.parent_model, self.parent_engine = place_parent(parent, self.accelerator, self.args.device)
        self.hkt_lineage = lineage_record(
            self.args, parent=parent_name, carriers=[str(c) for c in self.carriers],
            child_architecture=type(base_of(self.model)).__name__,
        )
        if self.args.hkt_on_nonfinite == "skip" and self.args.world_size > 1:
            raise ValueError("hkt_on_nonfinite='skip' works in a single process only; use 'stop' with several.")
        self._tag(self.model)
        self.add_callback(CheckpointCommitCallback())
        self.hkt_adapter: HKTAdapter | None = None
        self.hkt_skipped_batches = 0
        self._objective: HKTObjective | None = None
        self._hkt_logs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._resume_adapter_from: str | None = None
        if self.train_dataset is not None:  # else at the start of train(): before any optimizer exists either way
            self._build_adapter(self.model)
            self._include_adapter_in_optimizer()

    # ---- parent -------------------------------------------------------------------------------------------

    def _load_parent(self, parent: PreTrainedModel | nn.Module | str | None) -> nn.Module:
        """The parent model: loaded if named (with the Auto class of the child's task)."""
        if parent is None:
            raise ValueError(
                "No parent model: set HKTTrainingArguments(hkt_parent='path-or-hub-id') (CLI: --hkt_parent) or pass "
                "HKTTrainer(parent_model=...)."
            )
        if isinstance(parent, str):
            parent = load_parent(parent, self.model, self.args.hkt_parent_revision, self.args.hkt_parent_init_kwargs)
        return parent

    def _carriers_for(self, parent: nn.Module, child: nn.Module) -> list[CarrierPair]:
        """The carriers between `parent` and `child`, once the parent is known to be able to teach this child."""
        check_compatible(parent, child)
        return resolve_carriers(self.args.hkt_carriers, parent, child)

    def _tag(self, child: nn.Module) -> None:
        if hasattr(child, "add_model_tags"):
            child.add_model_tags(self._tag_names)

    # ---- adapter ------------------------------------------------------------------------------------------

    def _build_adapter(self, child: nn.Module) -> HKTAdapter:
        """Build the adapter for `child` from the carrier shapes of one probe of the first training batch, attach it
        (so that every optimizer made from now on sees its parameters) and make the step's objective.

        The batch is drawn, and the aligners initialised, on a fork of the random state: training then draws what the
        plain Trainer draws (dropout, data order)."""
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            inputs = send_to_device(self._first_batch(), self.args.device)
            replay = head_replay_possible(self.carriers, self.parent_model, child)
            with self.accelerator.autocast():  # as the training step runs
                parent_shapes, child_shapes, replay = probe(self.parent_model, child, self.carriers, inputs, replay)
            native_replay = (  # the native term from the replayed head only where it is the Trainer's own loss
                replay and self.label_smoother is None and self.compute_loss_func is None
                and self.model_accepts_loss_kwargs and own_loss_replayable(child, self.carriers[0].child, inputs)
            )
            adapter = HKTAdapter(self.carriers, parent_shapes, child_shapes, self.args.hkt_gate, self.args.hkt_lambda)
        adapter.to(device=self.args.device, dtype=next(child.parameters()).dtype)
        inject_adapter(child, adapter)
        self.hkt_adapter = adapter
        self._objective = HKTObjective(self.parent_model, self.carriers, self.args, replay, native_replay)
        return adapter

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
        """A user's optimizer (`optimizers=(optimizer, ...)`, made before the adapter existed) gets the adapter's
        trainable parameters as a group of its own with its defaults; with a user's scheduler too it is refused, since
        that scheduler was built without the group. Optimizers the Trainer made (prepared by Accelerate) hold them."""
        optimizer = self.optimizer
        if optimizer is None or isinstance(optimizer, AcceleratedOptimizer) or self.hkt_adapter is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.hkt_adapter.parameters() if p.requires_grad and id(p) not in held]
        if not missing:
            return
        if self.lr_scheduler is not None:
            raise ValueError(
                f"The optimizer given in `optimizers=(optimizer, lr_scheduler)` lacks the {len(missing)} trainable HKT "
                "adapter parameters (aligners, learned gates), and its scheduler was built without them. Either pass "
                "`optimizers=(optimizer, None)` (HKTTrainer adds them as a parameter group with the optimizer's "
                "defaults; the Trainer builds the scheduler from lr_scheduler_type), or "
                "`optimizer_cls_and_kwargs=(optimizer_class, kwargs)`, or create the trainer first, then the optimizer "
                "and scheduler over `trainer.model.parameters()` (which then include `hkt_adapter`), and set "
                "`trainer.optimizer` and `trainer.lr_scheduler`."
            )
        optimizer.add_param_group({"params": missing})
        logger.info(f"Added the {len(missing)} trainable HKT adapter parameters to the user's optimizer as a new group.")

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """`Trainer.call_model_init`; a child made for a `train()` run gets its own carriers and adapter here, before
        the Trainer makes its optimizer (and, on a resume, the checkpoint's adapter state)."""
        child = super().call_model_init(trial)
        if "parent_model" not in self.__dict__:  # from Trainer.__init__: HKTTrainer.__init__ builds the adapter
            return child
        if self.place_model_on_device:  # the Trainer moves it next; the probe needs it there now
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

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ):
        """`Trainer.train`, with the parent frozen and the HKT adapter attached for the run, both undone afterwards,
        whatever happens. With `model_init`, each run's new child gets a new adapter (`call_model_init`).

        `resume_from_checkpoint` only accepts checkpoints whose save completed (see `checkpointing.py`); the adapter
        resumes from the checkpoint's `hkt_adapter.safetensors`.
        """
        self._check_not_empty()
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        with ExitStack() as stack:
            # Frozen for the whole run too, not only inside each step: backward (and any activation checkpointing
            # recomputed in it) runs after `compute_loss` has returned.
            stack.enter_context(frozen(self.parent_model, self.args.hkt_parent_mode))
            stack.callback(release_parent_leftovers, self.parent_model, self.parent_engine)
            stack.callback(lambda: remove_adapter(self.accelerator.unwrap_model(self.model)))  # the run's last child
            self._resume_adapter_from = resume_from_checkpoint
            stack.callback(setattr, self, "_resume_adapter_from", None)
            if self.model_init is None:  # else Trainer.train calls `call_model_init`, which builds it
                self._attach_adapter()
            steps_before, skipped_before = self.state.global_step, self.hkt_skipped_batches
            output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
            self._check_skipped(self.state.global_step - steps_before, self.hkt_skipped_batches - skipped_before)
            return output

    def _check_skipped(self, steps: int, skipped: int) -> None:
        micro_batches = max(steps, 1) * self.args.gradient_accumulation_steps
        if skipped > MAX_SKIPPED_SHARE * micro_batches:
            raise NonFiniteLossError(
                f"{skipped} of {micro_batches} batches had NaN/inf losses and were skipped "
                f"(hkt_on_nonfinite='skip'): the child has not been trained. Check the parent {self.parent_name}, "
                "the labels (all -100?) and the learning rate."
            )

    # ---- loss and logging ---------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The HKT loss while training; the plain child loss in evaluation and prediction."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        child = self.accelerator.unwrap_model(model)
        release_parent_leftovers(self.parent_model, self.parent_engine)  # left by the previous step
        adapter = self._step_adapter()
        skip = self.args.hkt_on_nonfinite == "skip"
        restore = snapshot_buffers(child, self.parent_model) if skip else None
        with frozen(self.parent_model, self.args.hkt_parent_mode):
            try:
                result = self._run_objective(model, child, adapter, inputs, num_items_in_batch)
            except NonFiniteLossError as err:
                message = f"Step {self.state.global_step + 1}: {err}"
                if not skip:
                    raise NonFiniteLossError(
                        f"{message}. Training stopped; saved checkpoints are intact. If the parent is sound, resume "
                        "from the last checkpoint with a lower learning rate, or set hkt_on_nonfinite='skip' to drop "
                        "such batches."
                    ) from None
                restore()
                logger.warning(f"{message}; batch skipped (hkt_on_nonfinite='skip').")
                self.hkt_skipped_batches += 1
                zero = torch.zeros((), device=self.args.device, requires_grad=True)
                return (zero, None) if return_outputs else zero
        self._record(result)
        return (result.loss, result.outputs) if return_outputs else result.loss

    def _step_adapter(self) -> HKTAdapter:
        if self.hkt_adapter is None:
            raise RuntimeError(
                "HKTTrainer.compute_loss in training mode needs the HKT adapter, built from the first training batch "
                "before any optimizer: pass train_dataset to HKTTrainer(...), or call trainer.train()."
            )
        return self.hkt_adapter

    def _run_objective(
        self, model: nn.Module, child: nn.Module, adapter: HKTAdapter, inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> StepResult:
        """The objective under the run's autocast, inside the forward of any wrapper (DDP, DeepSpeed) around the child.

        A wrapper only synchronises parameters used inside its forward; running the whole objective there makes
        aligners, learned gates and replayed heads part of it: reduced once, never reported unused. FSDP2 shards the
        child in place (no wrapper), so the objective runs after the root's forward: Accelerate leaves the root's
        parameters (head, `hkt_adapter`) unsharded until backward, and sharded submodules gather on every call.
        """

        def native(batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
            return self._native_loss(batch, num_items_in_batch)

        def step() -> StepResult:
            with self.accelerator.autocast():
                return self._objective(child, adapter, inputs, native, self._items_per_process(num_items_in_batch))

        if model is child:
            return step()
        with forward_replaced(child, step):
            return model(**inputs)

    def _native_loss(
        self, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, Any]:
        # Trainer's own loss (label smoothing, compute_loss_func) on the bare child for the native term; it may pop
        # from the dict.
        child = self.accelerator.unwrap_model(self.model)
        return super().compute_loss(child, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _items_per_process(self, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | int | None:
        """The count the HKT terms divide by: `Trainer.compute_loss` multiplies a loss normalised by the count over
        all processes by their number (DDP averages gradients), so the same factor is taken out of the count."""
        if num_items_in_batch is None or not self.args.average_tokens_across_devices:
            return num_items_in_batch
        return num_items_in_batch / (self.accelerator.num_processes // self.get_tp_size())

    def _record(self, result: StepResult) -> None:
        for key, value in result.logs.items():
            self._hkt_logs[key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the HKT loss parts and gate statistics, averaged over the steps since the last training log."""
        if "loss" in logs and self._hkt_logs:
            for key, values in self._hkt_logs.items():
                mean = torch.stack(values).mean()
                if self.accelerator.num_processes > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[key] = mean.item()
            self._hkt_logs.clear()
        if "loss" in logs and self.hkt_skipped_batches:  # also when every step since the last log was skipped
            logs["hkt/skipped_batches"] = self.hkt_skipped_batches
        super().log(logs, start_time)

    # ---- saving -------------------------------------------------------------------------------------------

    def _full_adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's state gathered on every process (ZeRO-3 partitions and FSDP2 shards it with the child)."""
        adapter = get_adapter(self.accelerator.unwrap_model(self.model))
        params = list(adapter.parameters())
        gather = nullcontext()
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params)
        with gather:
            return {
                key: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu().clone()
                for key, value in adapter.state_dict().items()
            }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the plain child's weights: the adapter's keys are never in them), plus the lineage
        record and, while training, the adapter's state in its own file for an exact resume."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        adapter_state = self._full_adapter_state() if get_adapter(self.accelerator.unwrap_model(self.model)) else None
        if self.args.should_save:
            write_lineage(self.hkt_lineage, output_dir)
            if adapter_state is not None:
                save_adapter_state(adapter_state, output_dir)

    # ---- Hub ----------------------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """`Trainer.create_model_card` (same arguments, same meaning), with HKT's tags, the child's task when
        transformers cannot infer it, and the lineage section (parent, carriers, gate, weights, citation)."""
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in self._tag_names if tag not in tags]
        super().create_model_card(
            language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
            tasks=tasks if tasks is not None else task_of(self.model), dataset_tags=dataset_tags, dataset=dataset,
            dataset_args=dataset_args,
        )
        name = self.hub_model_id or self.args.hub_model_id or model_name or os.path.basename(self.args.output_dir)
        try:
            auto_class = auto_class_for(self.model).__name__
        except ValueError:  # an architecture no Auto class knows: the card cannot say how to load it
            auto_class = None
        add_lineage_to_card(os.path.join(self.args.output_dir, "README.md"), self.hkt_lineage, name, auto_class)


class HKTSeq2SeqTrainer(HKTTrainer, Seq2SeqTrainer):
    """`HKTTrainer` for sequence-to-sequence children: generation-based evaluation and prediction
    (`predict_with_generate`) from transformers' `Seq2SeqTrainer`. Takes `HKTSeq2SeqTrainingArguments`."""
