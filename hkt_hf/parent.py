"""The parent: loading it for the child's task, checking it can teach the child, and freezing it for one run only.

The user's parent object is never changed for good: `frozen` sets `requires_grad=False` and the run's mode
(`eval`, or batch-norm in train mode for `train-bn`) for a training run (and around each step, for callers of
`compute_loss`) and restores both after it, so trainers sharing one parent never see each other's settings, and no
gradient ever reaches its weights. Its dtype is left alone: features cross between the two models through
the aligners, which cast them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .extraction import base_of
from .tasks import auto_class_for, is_classifier, task_of

PEFT_ADAPTER_CONFIG = "adapter_config.json"


def load_parent(name: str, child: nn.Module, revision: str | None, init_kwargs: dict[str, Any] | None) -> nn.Module:
    """Load a parent by path or Hub id with the Auto class of the child's task (never a headless model for a child
    with a head). A folder holding a PEFT adapter is loaded on its base model and merged: the parent is frozen."""
    kwargs = dict(init_kwargs or {})
    if revision is not None:
        kwargs.setdefault("revision", revision)
    auto_class = auto_class_for(child)
    if os.path.isfile(Path(name) / PEFT_ADAPTER_CONFIG):
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(name).base_model_name_or_path
        parent = PeftModel.from_pretrained(auto_class.from_pretrained(base_name, **kwargs), name)
        return parent.merge_and_unload()
    return auto_class.from_pretrained(name, **kwargs)


def default_label_names(labels: dict) -> bool:
    return all(str(name) == f"LABEL_{i}" for i, name in labels.items())


def label_names(config: Any) -> list[str]:
    """`id2label` in id order; keys may be strings (as `run_image_classification.py` builds them) or ints."""
    by_id = {int(k): v for k, v in config.id2label.items()}
    return [by_id[i] for i in sorted(by_id)]


def check_compatible(parent: nn.Module, child: nn.Module) -> None:
    """Refuse a parent that cannot teach this child: the same object, another task, or another label set."""
    if parent is child or base_of(parent) is base_of(child):
        raise ValueError("The parent is the child object itself; load a separate (larger, pretrained) parent model.")
    if task_of(parent) != task_of(child):
        raise ValueError(
            f"Parent ({type(base_of(parent)).__name__}, task {task_of(parent)}) and child "
            f"({type(base_of(child)).__name__}, task {task_of(child)}) solve different tasks; HKT needs both to be "
            "trained for the same task with the same labels."
        )
    pc, cc = getattr(base_of(parent), "config", None), getattr(base_of(child), "config", None)
    if is_classifier(child) and pc is not None and cc is not None:
        if pc.num_labels != cc.num_labels:
            raise ValueError(
                f"Parent has {pc.num_labels} labels, child has {cc.num_labels}; HKT needs the same label set. "
                "Use a parent fine-tuned on the child's task."
            )
        if not (default_label_names(pc.id2label) or default_label_names(cc.id2label)):
            if label_names(pc) != label_names(cc):
                raise ValueError(
                    f"Parent labels {label_names(pc)} differ from child labels {label_names(cc)}; align id2label first."
                )


def check_finite_weights(parent: nn.Module, name: str) -> None:
    """Refuse a parent with NaN/inf weights or buffers (a corrupted file, a diverged run) before training starts."""
    for key, tensor in parent.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"The parent {name} has non-finite values (NaN or inf) in '{key}': it cannot teach. Check the parent "
                "checkpoint (re-download or re-train it)."
            )


@contextmanager
def frozen(parent: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Freeze `parent` in the run's mode for the duration of the block; restore the caller's settings after.

    Cheap (flags only, no tensor is touched); nests (an inner block restores the outer block's settings)."""
    grads = {p: p.requires_grad for p in parent.parameters()}
    modes = {m: m.training for m in parent.modules()}
    parent.requires_grad_(False)
    parent.eval()
    if mode == "train-bn":
        for module in parent.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    try:
        yield parent
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag
