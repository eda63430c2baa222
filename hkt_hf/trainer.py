"""`HKTTrainer`: transformers' Trainer with Hereditary Knowledge Transfer from a frozen parent.

Swap `Trainer` for `HKTTrainer` and `TrainingArguments` for `HKTTrainingArguments`, name a parent, and the child
trains with the HKT objective (see `objective.py`). Evaluation, prediction and `save_model` see the child alone.
Only public Trainer hooks are overridden (`train`, `compute_loss`, `log`, `save_model`, `create_model_card`, and
`call_model_init` in `adapter_lifecycle.py`, which gives each child its adapter before any optimizer exists); the one
workaround for a transformers bug lives in `compat.py`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Seq2SeqTrainer
from transformers.utils import logging

from .adapter import HKTAdapter, get_adapter, remove_adapter, save_adapter_state
from .adapter_lifecycle import AdapterLifecycle
from .checkpointing import CheckpointCommitCallback, begin_save, prepare_resume
from .lineage import lineage_record, parent_identity, write_lineage
from .model_card import TAGS, add_lineage_to_card
from .model_state import base_of, forward_replaced, snapshot_buffers, whole_state
from .objective import NonFiniteLossError, StepResult
from .parent import check_finite_weights, frozen, load_parent
from .probing import loss_ignores_item_count
from .search import trial_hkt_settings
from .sharding import place_parent, release_parent_leftovers
from .tasks import auto_class_for, task_of
from .training_args import HKTTrainingArguments

logger = logging.get_logger(__name__)

# A run whose skipped batches exceed this share of its steps has not trained: it fails instead of "succeeding".
MAX_SKIPPED_SHARE = 0.5


class HKTTrainer(AdapterLifecycle):
    """A drop-in `Trainer` whose training loss is the HKT objective.

    Args:
        parent_model: the parent, as a model or a path / Hub id; defaults to `args.hkt_parent`. A model object is
            left as it was given once training ends (mode, `requires_grad`, dtype, weights).
        Everything else is passed to `transformers.Trainer` unchanged.

    The aligners and gates (`trainer.hkt_adapter`) are attached to the child before any optimizer exists, so every
    optimizer trains them (`adapter_lifecycle.py`). After `train()` the adapter is detached from the child; a later
    `train()` call (a second run, or an in-process resume) trains the same adapter with the same optimizer. With
    `model_init`, each `train()` gets a new child, with its own carriers and adapter.
    """

    _tag_names = TAGS

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
            parent_name = getattr(getattr(base_of(parent), "config", None), "name_or_path", None) or None
        self.parent_name = parent_name or type(base_of(parent)).__name__
        check_finite_weights(parent, self.parent_name)
        identity = parent_identity(parent)  # by content, while the parent is still whole
        self.parent_source = parent_name  # where it was loaded from, if by name: its tokenizer may be saved there
        self.carriers = self._carriers_for(parent, self.model)
        # Under ZeRO-3 `parent_engine` owns the parent's partitions and gather hooks; None otherwise.
        self.parent_model, self.parent_engine = place_parent(parent, self.accelerator, self.args.device)
        self.hkt_lineage = lineage_record(
            self.args, parent=parent_name, carriers=[str(c) for c in self.carriers],
            child_architecture=type(base_of(self.model)).__name__, **identity,
        )
        self._check_nonfinite_policy()
        self._tag(self.model)
        self.add_callback(CheckpointCommitCallback())
        self.hkt_skipped_batches = 0
        self._hkt_logs: dict[str, list[torch.Tensor]] = defaultdict(list)
        if self.train_dataset is not None:  # else at the start of train(): before any optimizer exists either way
            self._build_adapter(self.model)
            self._include_adapter_in_optimizer()

    def _check_nonfinite_policy(self) -> None:
        if self.args.hkt_on_nonfinite == "skip" and self.args.world_size > 1:
            raise ValueError("hkt_on_nonfinite='skip' works in a single process only; use 'stop' with several.")

    def _apply_trial(self, trial: Any) -> None:
        """A `hyperparameter_search` trial's `hkt_*` values on `args` and the lineage, before `Trainer.train` builds
        the trial's child and adapter from them (`search.py`)."""
        settings = trial_hkt_settings(self, trial)
        for key, value in settings.items():
            setattr(self.args, key, value)
        self._check_nonfinite_policy()
        self.hkt_lineage.update({k: v for k, v in settings.items() if k != "hkt_carriers"})  # resolved per child

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
        self._apply_trial(trial)
        with ExitStack() as stack:
            # The adapter leaves the child when train() ends, whatever ends it (a refused resume too).
            stack.callback(lambda: remove_adapter(self.accelerator.unwrap_model(self.model)))  # the run's last child
            resume_from_checkpoint, self.hkt_lineage = prepare_resume(
                resume_from_checkpoint, self.args.output_dir, self.hkt_lineage
            )
            # Frozen for the whole run too, not only inside each step: backward (and any activation checkpointing
            # recomputed in it) runs after `compute_loss` has returned.
            stack.enter_context(frozen(self.parent_model, self.args.hkt_parent_mode))
            stack.callback(release_parent_leftovers, self.parent_model, self.parent_engine)
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

        with self.accelerator.autocast():
            items, mean_factor = self._items_per_process(inputs, num_items_in_batch)

        def step() -> StepResult:
            with self.accelerator.autocast():
                return self._objective(child, adapter, inputs, native, items, mean_factor=mean_factor,
                                       label_names=self.label_names)

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

    def _items_per_process(
        self, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor | int | None, float]:
        """How the Trainer normalises the child's loss on this batch, for the HKT terms to follow it:
        (the count it divides the summed loss by, 1.0), or (None, its factor) where that loss is a mean over the batch.

        `Trainer.compute_loss` multiplies its loss by the number of processes when it has the count (DDP averages
        gradients): a count over all processes is divided by it, a mean multiplied. A loss is a mean without the
        count (the Trainer then divides it by the accumulation steps itself), or with it when the model ignores it
        (BERT's classifiers: the Trainer divides by nothing), which the first step measures
        (`loss_ignores_item_count`); a `compute_loss_func` is taken to use it, as the Trainer does."""
        if num_items_in_batch is None:
            return None, 1.0
        factor = 1.0
        if self.args.average_tokens_across_devices:
            factor = float(self.accelerator.num_processes // self.get_tp_size())
        if self._objective.native_is_mean is None:
            child = self.accelerator.unwrap_model(self.model)
            self._objective.native_is_mean = self.compute_loss_func is None and loss_ignores_item_count(
                lambda count: self._native_loss(inputs, count)[0], child, num_items_in_batch)
        if self._objective.native_is_mean:
            return None, factor
        return (num_items_in_batch / factor if factor != 1 else num_items_in_batch), 1.0

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
        return {key: value.detach().cpu().clone() for key, value in whole_state(adapter)}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the plain child's weights: the adapter's keys are never in them), plus the lineage
        record and, while training, the adapter's state in its own file for an exact resume. A save of the plain child
        leaves no adapter state or completion marker of an earlier save in the folder (`checkpointing.begin_save`)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        attached = get_adapter(self.accelerator.unwrap_model(self.model)) is not None
        if self.args.should_save:
            begin_save(output_dir, attached)
        super().save_model(output_dir, _internal_call)
        adapter_state = self._full_adapter_state() if attached else None
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
