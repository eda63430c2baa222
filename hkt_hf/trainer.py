"""`HKTTrainer`: transformers' Trainer with Hereditary Knowledge Transfer from a frozen parent.

Swap `Trainer` for `HKTTrainer` and `TrainingArguments` for `HKTTrainingArguments`, name a parent, and the child
trains with the HKT objective (see `objective.py`). Evaluation, prediction and `save_model` see the child alone.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from transformers.utils import logging
from accelerate.utils import send_to_device
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_NAME

from .adapter import HKTAdapter, get_adapter, inject_adapter, remove_adapter
from .carriers import resolve_carriers
from .checkpointing import CheckpointCommitCallback, load_runtime_state_dict, resolve_resume_checkpoint
from .config import HKTConfig
from .objective import HKTObjective, NonFiniteLossError, StepResult, head_replay_possible, probe
from .tasks import is_classifier
from .training_args import HKTTrainingArguments

logger = logging.get_logger(__name__)


def auto_class_for(model: nn.Module) -> type:
    """The Auto class matching `model`'s head, e.g. `AutoModelForImageClassification` for `*ForImageClassification`."""
    match = re.search(r"(For[A-Za-z]+)$", type(model).__name__)
    auto = getattr(transformers, f"AutoModel{match.group(1)}", None) if match else None
    return auto or transformers.AutoModel


def default_label_names(labels: dict) -> bool:
    return all(str(name) == f"LABEL_{i}" for i, name in labels.items())


def check_compatible(parent: nn.Module, child: nn.Module) -> None:
    """Refuse a parent that cannot teach this child: the same object, or a different label set."""
    if parent is child:
        raise ValueError("The parent is the child object itself; load a separate (larger, pretrained) parent model.")
    if is_classifier(parent) != is_classifier(child):
        raise ValueError(
            f"Parent ({type(parent).__name__}) and child ({type(child).__name__}) solve different tasks; HKT needs "
            "both to be trained for the same task with the same labels."
        )
    pc, cc = getattr(parent, "config", None), getattr(child, "config", None)
    if is_classifier(child) and pc is not None and cc is not None:
        if pc.num_labels != cc.num_labels:
            raise ValueError(
                f"Parent has {pc.num_labels} labels, child has {cc.num_labels}; HKT needs the same label set. "
                "Use a parent fine-tuned on the child's task."
            )
        if not (default_label_names(pc.id2label) or default_label_names(cc.id2label)):
            p_names, c_names = [pc.id2label[i] for i in range(pc.num_labels)], [cc.id2label[i] for i in range(cc.num_labels)]
            if p_names != c_names:
                raise ValueError(f"Parent labels {p_names} differ from child labels {c_names}; align id2label first.")


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


class HKTTrainer(Trainer):
    """A drop-in `Trainer` whose training loss is the HKT objective.

    Args:
        parent_model: the parent, as a model or a path / Hub id; defaults to `args.hkt_parent`.
        Everything else is passed to `transformers.Trainer` unchanged.

    After `train()`, `trainer.hkt_adapter` holds the aligners and gates, detached from the child.
    """

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
                f"HKTTrainer needs HKTTrainingArguments, got {type(args).__name__}: replace "
                "`TrainingArguments(...)` with `HKTTrainingArguments(...)` (same fields, plus the hkt_* ones)."
            )
        if model is None:
            raise ValueError("HKTTrainer needs the child `model`; `model_init` is not supported.")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self.parent_model = self._load_parent(parent_model)
        check_compatible(self.parent_model, self.model)
        self.carriers = resolve_carriers(self.args.hkt_carriers, self.parent_model, self.model)
        parent_name = parent_model if isinstance(parent_model, str) else self.args.hkt_parent
        if parent_name is None:
            parent_name = getattr(getattr(self.parent_model, "config", None), "_name_or_path", None) or None
        self.hkt_config: HKTConfig = self.args.to_hkt_config(
            parent=parent_name, carriers=[str(c) for c in self.carriers], child_architecture=type(self.model).__name__
        )
        if self.hkt_config.on_nonfinite == "skip" and self.args.world_size > 1:
            raise ValueError("hkt_on_nonfinite='skip' works in a single process only; use 'stop' with several.")
        self.add_callback(CheckpointCommitCallback())
        self.hkt_adapter: HKTAdapter | None = None
        self.hkt_skipped_batches = 0
        self._objective: HKTObjective | None = None
        self._hkt_logs: dict[str, list[torch.Tensor]] = defaultdict(list)

    # ---- parent -------------------------------------------------------------------------------------------

    def _load_parent(self, parent: PreTrainedModel | nn.Module | str | None) -> nn.Module:
        parent = parent if parent is not None else self.args.hkt_parent
        if parent is None:
            raise ValueError(
                "No parent model: set HKTTrainingArguments(hkt_parent='path-or-hub-id') (CLI: --hkt_parent) or pass "
                "HKTTrainer(parent_model=...)."
            )
        if isinstance(parent, str):
            parent = auto_class_for(self.model).from_pretrained(parent, revision=self.args.hkt_parent_revision)
        dtype = next(self.model.parameters()).dtype
        parent.requires_grad_(False)
        parent.to(device=self.args.device, dtype=dtype)
        parent.eval()
        if self.args.hkt_parent_mode == "train-bn":
            for module in parent.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        return parent

    # ---- adapter ------------------------------------------------------------------------------------------

    def _ensure_adapter(self, child: nn.Module, inputs: dict[str, Any]) -> HKTAdapter:
        """Build the aligners and gates from the carrier shapes seen on `inputs`, once, and attach them."""
        adapter = get_adapter(child)
        if adapter is not None and self._objective is not None:
            return adapter
        replay = head_replay_possible(self.carriers, self.parent_model, child)
        parent_shapes, child_shapes, replay = probe(self.parent_model, child, self.carriers, inputs, replay)
        if adapter is None:
            adapter = HKTAdapter(self.carriers, parent_shapes, child_shapes, self.args.hkt_gate, self.args.hkt_lambda)
            adapter.to(device=self.args.device, dtype=next(child.parameters()).dtype)
            inject_adapter(child, adapter)
        self._objective = HKTObjective(self.parent_model, self.carriers, self.args, replay)
        return adapter

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, with the HKT adapter attached for the run and removed afterwards, whatever happens.

        `resume_from_checkpoint` only accepts checkpoints whose save completed (see `checkpointing.py`).
        """
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise ValueError("The training dataset is empty; HKT needs labelled training examples.")
        resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        with torch.random.fork_rng(devices=[self.args.device] if self.args.device.type == "cuda" else []):
            batch = next(iter(self.get_train_dataloader()))
        self._ensure_adapter(self.model, send_to_device(batch, self.args.device))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.hkt_adapter = remove_adapter(self.accelerator.unwrap_model(self.model))
            self._objective = None

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
        adapter = self._ensure_adapter(child, inputs)
        try:
            result = self._run_objective(model, child, adapter, inputs, num_items_in_batch)
        except NonFiniteLossError as err:
            message = f"Step {self.state.global_step + 1}: {err}"
            if self.hkt_config.on_nonfinite == "stop":
                raise NonFiniteLossError(
                    f"{message}. Training stopped; saved checkpoints are intact. Resume from the last one with a "
                    "lower learning rate, or set hkt_on_nonfinite='skip' to drop such batches."
                ) from None
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's resume loader, reading back the key names `save_pretrained` wrote (see `load_runtime_state_dict`)."""
        child = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if self.is_fsdp_enabled or not isinstance(child, PreTrainedModel) or not os.path.isfile(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._issue_warnings_after_load(child.load_state_dict(load_runtime_state_dict(child, weights), strict=False))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the adapter (exact resume); a user's `save_model` writes the plain child."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
        else:
            child = self.accelerator.unwrap_model(self.model)
            adapter = remove_adapter(child)
            try:
                super().save_model(output_dir, _internal_call=False)
            finally:
                if adapter is not None:
                    inject_adapter(child, adapter)
        if self.args.should_save:
            self.hkt_config.to_json_file(output_dir)

    # ---- Hub ----------------------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, **card_info: Any):
        """Write the HKT model card to `output_dir/README.md`; `card_info` as `hkt_hf.hub.render_model_card`
        (e.g. `dataset=`, `parent_metrics=`, `license=`). Child metrics come from the latest evaluation."""
        from . import hub

        if not self.is_world_process_zero():
            return None
        card = hub.render_model_card(
            self.hkt_config, model_name or hub.trainer_model_name(self), **hub.trainer_card_info(self, **card_info)
        )
        card.save(f"{self.args.output_dir}/README.md")
        return card

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any):
        """Push the plain child, its processor, `hkt_config.json` and the HKT model card; never aligners or gates.
        Takes `Trainer.push_to_hub`'s `token`, `revision`, `private`, plus `create_model_card`'s `card_info`."""
        from . import hub

        return hub.push_trainer(self, commit_message or "End of training", blocking, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's mid-training pushes copy checkpoint weights, which hold the training-only adapter: HKT pushes the
        plain child through `push_to_hub` (at the end, or when the user saves) instead."""
        if self.is_world_process_zero():
            logger.warning_once("HKTTrainer does not push checkpoints during training; call trainer.push_to_hub() after.")
