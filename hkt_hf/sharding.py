"""Where the parent lives in a distributed run: whole on each device, or sharded like the child.

A parent too large for one device is only usable if it is split like the child. Under DeepSpeed ZeRO-3 the parent goes
through its own `deepspeed.initialize` (no optimizer), as TRL prepares teachers (`trl.models.utils.prepare_deepspeed`);
under FSDP2 it is `fully_shard`-ed by Accelerate's own `fsdp2_prepare_model`, in the units the run uses for the child.
Either way every process keeps a slice of each parameter and the module hooks of ZeRO-3 / FSDP2 gather a module's
parameters for its forward, so the carrier hooks, the head replay and its backward work on the sharded parent
unchanged. Other runs place the parent whole on the run's device and nothing else: no Accelerate wrapper or
instance-level `forward` is added to the user's object (the objective runs it under the run's autocast already).
"""

from __future__ import annotations

import copy
from typing import Any

from accelerate import Accelerator
from torch import nn

# The bucket sizes a ZeRO-3 config may leave to "auto": transformers fills them from the child's hidden size when
# training starts, too late and from the wrong model for the parent; the parent's own size is used (TRL's choice).
ZERO3_AUTO_SIZES = {
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
}


def zero_stage(accelerator: Accelerator) -> int:
    """The run's ZeRO stage, 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else getattr(config, "hidden_size", None)


def parent_zero3_config(run_config: dict[str, Any], parent: nn.Module) -> dict[str, Any]:
    """The run's DeepSpeed config for an inference-only parent: no optimizer, scheduler or optimizer offload, and
    the size-dependent "auto" values set from the parent (or left to DeepSpeed's defaults when it has no size)."""
    config = copy.deepcopy(run_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config["zero_optimization"]
    zero.pop("offload_optimizer", None)
    hidden = hidden_size(parent)
    for key, size in ZERO3_AUTO_SIZES.items():
        if zero.get(key) == "auto":
            if hidden is None:
                del zero[key]
            else:
                zero[key] = size(hidden)
    return config


def shard_with_fsdp2(parent: nn.Module, accelerator: Accelerator) -> nn.Module:
    """`fully_shard` the parent in the run's FSDP2 units. It is frozen while Accelerate shards it: under mixed
    precision Accelerate upcasts trainable parameters to fp32 master weights, which a bf16 parent must not get."""
    from accelerate.utils import fsdp2_prepare_model

    trainable = {name for name, p in parent.named_parameters() if p.requires_grad}
    parent.requires_grad_(False)
    parent = fsdp2_prepare_model(accelerator, parent)
    for name, p in parent.named_parameters():
        p.requires_grad_(name in trainable)
    return parent


def place_whole(parent: nn.Module, device: Any) -> nn.Module:
    """The parent on `device`, unless it was dispatched with a `device_map` (big or quantised models), which stays
    where it was put. Accelerate's `prepare_model(evaluation_mode=True)` is not used: under bf16 / fp16 it replaces the
    instance's `forward` with an autocast wrapper that outlives the run (later plain calls, or a trainer in another
    precision sharing the parent, would run in this run's precision)."""
    return parent if getattr(parent, "hf_device_map", None) else parent.to(device)


def place_parent(parent: nn.Module, accelerator: Accelerator, device: Any) -> tuple[nn.Module, Any]:
    """Shard `parent` under ZeRO-3 or FSDP2; otherwise place it whole on `device`. Returns the module itself (carriers
    name its modules) and, under ZeRO-3, the engine that owns its partitions and hooks (to be kept alive as long as
    the parent is used), else None."""
    if getattr(accelerator, "is_fsdp2", False):
        return shard_with_fsdp2(parent, accelerator), None
    if zero_stage(accelerator) != 3:
        return place_whole(parent, device), None
    import deepspeed

    config = parent_zero3_config(accelerator.state.deepspeed_plugin.deepspeed_config, parent)
    engine, *_ = deepspeed.initialize(model=parent, config=config)
    return parent, engine


def release_parent_leftovers(parent: nn.Module, engine: Any) -> None:
    """Shard again the parent parameters gathered in a step and left whole. ZeRO-3: a carrier module whose output is
    replaced by a mixture that needs grad is gathered for backward, but released only when the module's input needs
    grad, and the parent's never does (DeepSpeed's `partition_all_parameters` describes this case). FSDP2: units that
    keep their parameters after forward (Accelerate's head unit, the root) are resharded only at the end of a
    backward through them, which a no-grad parent pass never has. No-op for a parent that is not sharded."""
    if engine is not None:
        engine.optimizer.partition_all_parameters()
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(parent, FSDPModule):  # the root of every parent that `shard_with_fsdp2` sharded
        for module in parent.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
