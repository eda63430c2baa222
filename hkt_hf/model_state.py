"""Temporary states of a model, each undone when its block ends or its `restore()` runs: its mode, its batch-norm
statistics and buffers, its forward; the model under a PEFT wrapper, whose module names carriers use; and its state
whole, wherever DeepSpeed or FSDP2 put its pieces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .compat import is_batch_norm


def base_of(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (`get_base_model()`), else the model itself: carriers name its modules."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def whole_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict in sorted key order, each tensor whole: a ZeRO-3 partition gathered (one at a time,
    so a model partitioned at load time is never whole in memory) or a DTensor's shards joined."""
    params = dict(model.named_parameters(remove_duplicate=False))
    state = model.state_dict()
    for key in sorted(state):
        param = params.get(key)
        if param is not None and hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield key, param.detach().cpu().clone()
        else:
            tensor = state[key]
            yield key, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


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


@contextmanager
def in_eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block (no dropout, no batch-norm update); each module's own mode is restored after,
    which keeps a `train-bn` parent's batch-norm layers as they were."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """While active, the model's batch-norm layers in train mode still normalise with the batch's statistics but do
    not update their running statistics (nor `num_batches_tracked`): extra passes over a batch whose statistics the
    model's own pass has already counted, partly on mixed features, must not count it again."""
    norms = [m for m in model.modules()
             if is_batch_norm(m) and m.training and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True
