"""A tiny HKT run through the Trainer with Accelerate's FSDP2 path on CPU (gloo), for `tests/test_fsdp.py`.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json [--per-device-batch N]
       python tests/fsdp_worker.py OUT.json          (1 process, no FSDP: the reference run)
       python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json --per-device-batch 4 \
           --deepspeed {2,3}                         (DeepSpeed ZeRO-2/3 on CPU instead of FSDP2, for
                                                      `tests/test_deepspeed.py`; `deepspeed` is in the `dev` extra)

Accelerate selects FSDP only for GPU-type backends: with `use_cpu` it sets `distributed_type` to MULTI_CPU and drops
the FSDP plugin, so the Trainer silently trains with DDP; without `use_cpu` on a CPU-only host the Trainer refuses
with "Using fsdp only works in distributed training." `CPUFSDPTrainer` therefore does, after the Trainer has built
its Accelerator on gloo, the three assignments Accelerate's `AcceleratorState.__init__` makes when it selects FSDP on
a GPU backend (`distributed_type = FSDP`, `fsdp_plugin = ...`, the same type copied to `PartialState`). Everything
after that is unmodified transformers and Accelerate code: `Accelerator.prepare` -> `fsdp2_prepare_model`
(`fully_shard` of each `ViTLayer`, of the patch embedding, of the final norm and of the root, which holds the head
and `hkt_adapter`), FSDP2's optimizer handling, `get_state_dict` for `save_model`.

With `--deepspeed N` the Trainer itself builds a `DeepSpeedEngine` on each process (DeepSpeed's CPU accelerator, gloo;
no shim needed): see `deepspeed_config` and `DEEPSPEED_SHM_OP`.

Rank 0 writes, per setting: the logged loss trajectory and `hkt/*` logs, where FSDP or ZeRO placed the child's and
the parent's parameters, the learned-gate lambdas (gathered from their shards) and the saved child's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import GLOBAL_BATCH, SETTINGS, STEPS  # noqa: E402
from helpers import image_dataset, one_torch_thread, tiny_vit, training_args  # noqa: E402

from hkt_hf import HKTTrainer  # noqa: E402

# Accelerate's default FSDP2 wrap policy (the model's `_no_split_modules`) makes ViTEmbeddings a unit and then calls
# `fully_shard` on `get_input_embeddings()` (the patch embedding inside it) again, which fails in accelerate 1.15 with
# "TypeError: Invariant encountered: value was None when it should not be". Wrapping the layers only avoids that.
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["ViTLayer"], "state_dict_type": "FULL_STATE_DICT"}


class CPUFSDPTrainer(HKTTrainer):
    """`HKTTrainer` whose Accelerator runs the FSDP2 path on CPU processes (see the module docstring)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"expected Accelerate's MULTI_CPU state under torchrun, got {state.distributed_type}")
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate/state.py does
        self.is_fsdp_enabled = True


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded(param: torch.Tensor) -> bool:
    """Sharded by FSDP2 (a DTensor) or partitioned by DeepSpeed ZeRO-3 (carries a `ds_id`)."""
    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def learned_lambdas(adapter: torch.nn.Module) -> list[float]:
    gates = [g for g in adapter.gates if hasattr(g, "lam_logit")]
    if any(hasattr(g.lam_logit, "ds_id") for g in gates):  # ZeRO-3: gather the partitions to read them
        import deepspeed

        with deepspeed.zero.GatheredParameters([g.lam_logit for g in gates]):
            return [float(torch.sigmoid(g.lam_logit.detach())) for g in gates]
    return [float(torch.sigmoid(full(g.lam_logit).detach())) for g in gates]


# On CPU, DeepSpeed's comm backend compiles its shared-memory op (C++, ~35 s on 2 cores, needs g++) when it starts,
# but uses it only for `inference_all_reduce` (deepspeed/comm/torch.py, 0.19.8): training collectives go through
# torch.distributed (gloo) either way. Marking the op incompatible, in the dict DeepSpeed probes before building it
# (`deepspeed.ops.__compatible_ops__`), skips the build and changes nothing that training uses.
DEEPSPEED_SHM_OP = "deepspeed_shm_comm"


def deepspeed_config(stage: int) -> dict:
    """ZeRO-`stage` in fp32 with the Trainer's own AdamW (DeepSpeed's FusedAdam would need a C++ build first).

    ZeRO-3 keeps every parameter under `stage3_param_persistence_threshold` (default 1e5 elements) whole on every
    rank, which would be every parameter of these tiny models: 0 makes it partition them all, so that the child's
    forward, the head replay, the truncated passes and the adapter really run through ZeRO-3's gather hooks."""
    return {
        "zero_optimization": {
            "stage": stage, "stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0,
        },
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False},
    }


def zero_partitioning(trainer: HKTTrainer, adapter: torch.nn.Module) -> dict:
    """How ZeRO split the child's and adapter's state across the processes, as seen on this rank."""
    engine = trainer.model_wrapped
    params = list(trainer.model.parameters()) + list(adapter.parameters())
    info = {
        "engine": type(engine).__name__,
        "stage": engine.zero_optimization_stage(),
        "optimizer": type(engine.optimizer).__name__,
        "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }
    if info["stage"] == 3:  # parameters: a local slice `ds_tensor` each, the full `.data` released outside forward
        info["param_numel"] = [[p.ds_numel, p.ds_tensor.numel(), p.data.numel()] for p in params]
    else:  # ZeRO-2: whole parameters on every rank, the fp32 master weights and Adam's state partitioned
        info["fp32_partition_numel"] = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    return info


def parent_state(parent: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parent's whole state, gathered from FSDP2's shards or ZeRO-3's partitions if it has them."""
    params = [p for p in parent.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {k: full(v).clone() for k, v in parent.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return {k: v.clone() for k, v in parent.state_dict().items()}


def parent_partitioning(parent: torch.nn.Module) -> dict | None:
    """How the parent is sharded, as seen on this rank: `by` (`fsdp2`: rows of dim 0 per rank; `zero3`: a flat
    slice), and per parameter [whole numel, rows (dim 0), this rank's slice, numel held whole outside forward
    (ZeRO-3's `.data`; 0 for a DTensor, which only holds its slice)]. None for a whole parent."""
    params = list(parent.parameters())
    if all(isinstance(p, DTensor) for p in params):
        return {"by": "fsdp2", "params": [[p.numel(), p.shape[0], p.to_local().numel(), 0] for p in params]}
    if all(hasattr(p, "ds_id") for p in params):
        return {"by": "zero3",
                "params": [[p.ds_numel, p.ds_shape[0], p.ds_tensor.numel(), p.data.numel()] for p in params]}
    return None


RESUME_FROM = STEPS // 2  # the resumed run starts from this checkpoint of the uninterrupted one


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The worker's parent and child, the same each time."""
    return tiny_vit(32, layers=2, seed=1), tiny_vit(16, layers=2, seed=2)


def make_trainer(parent: torch.nn.Module, child: torch.nn.Module, hkt: dict, per_device_batch: int, output_dir: str,
                 fsdp: bool, zero_stage: int) -> HKTTrainer:
    extra = dict(fsdp=True, fsdp_config=dict(FSDP_CONFIG)) if fsdp else {}
    if zero_stage:
        fsdp, extra = False, dict(deepspeed=deepspeed_config(zero_stage))
    # Checkpoints while the adapter is attached: its state is saved whole from the shards.
    args = training_args(
        output_dir, per_device_train_batch_size=per_device_batch, max_steps=STEPS, learning_rate=5e-3,
        save_strategy="steps", save_steps=RESUME_FROM, **extra, **hkt
    )
    return (CPUFSDPTrainer if fsdp else HKTTrainer)(
        child, args, train_dataset=image_dataset(GLOBAL_BATCH * STEPS), parent_model=parent
    )


def resumed(hkt: dict, per_device_batch: int, output_dir: str, fsdp: bool, zero_stage: int) -> dict:
    """A second run from the first's middle checkpoint (child, adapter, optimizer, scheduler, RNG states): its
    losses after the resume point and its saved child, for comparison with the uninterrupted run."""
    trainer = make_trainer(*models(), hkt, per_device_batch, f"{output_dir}/resumed", fsdp, zero_stage)
    trainer.train(resume_from_checkpoint=f"{output_dir}/checkpoint-{RESUME_FROM}")
    trainer.save_model(f"{output_dir}/resumed/child")
    history = trainer.state.log_history  # the checkpoint's logs, then the resumed steps'
    return {"losses": [log["loss"] for log in history if "loss" in log and log["step"] > RESUME_FROM],
            "saved": f"{output_dir}/resumed/child"}


def run(name: str, hkt: dict, per_device_batch: int, output_dir: str, fsdp: bool, zero_stage: int = 0) -> dict:
    if zero_stage:
        import deepspeed

        deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False
    parent, child = models()
    parent_before = {k: v.clone() for k, v in parent.state_dict().items()}
    trainer = make_trainer(parent, child, hkt, per_device_batch, output_dir, fsdp, zero_stage)
    trainer.train()
    history = [log for log in trainer.state.log_history if "loss" in log]
    adapter = trainer.hkt_adapter
    saved = f"{output_dir}/child"
    zero = zero_partitioning(trainer, adapter) if zero_stage else None
    trainer.save_model(saved)  # the plain child (adapter removed), gathered from the shards on rank 0
    return {
        "zero": zero,
        "losses": [log["loss"] for log in history],
        "hkt_logs": [{k: v for k, v in log.items() if k.startswith("hkt/")} for log in history],
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_units": sorted(n for n, m in trainer.model.named_modules() if isinstance(m, FSDPModule)),
        "child_params_sharded": all(sharded(p) for p in trainer.model.parameters()),
        "adapter_params_sharded": all(sharded(p) for p in adapter.parameters()),
        "adapter_in_child_after_train": any("hkt_adapter" in n for n, _ in trainer.model.named_parameters()),
        "lambda": learned_lambdas(adapter),
        "parent_is_fsdp": any(isinstance(m, FSDPModule) for m in parent.modules()),
        "parent_fsdp_units": sorted(n for n, m in parent.named_modules() if isinstance(m, FSDPModule)),
        "parent_params_sharded": any(sharded(p) for p in parent.parameters()),
        # Given trainable (built from a config), frozen for each step only: it must come back as it was given.
        "parent_requires_grad_as_given": all(p.requires_grad for p in parent.parameters()),
        "parent_grads": sum(p.grad is not None for p in parent.parameters()),
        "parent_partitions": parent_partitioning(parent),
        "parent_changed": max(float((v - parent_before[k]).abs().max()) for k, v in parent_state(parent).items()),
        "saved": saved,
        "checkpoint": f"{output_dir}/checkpoint-{STEPS}",
        "resumed": resumed(hkt, per_device_batch, output_dir, fsdp, zero_stage),
    }


def one_process_runs(folder: Path) -> dict:
    """The reference the tests compare with: every setting with the plain trainer in the calling process, the whole
    global batch on it (what `python tests/fsdp_worker.py OUT.json` writes)."""
    with one_torch_thread():
        return {name: run(name, hkt, GLOBAL_BATCH, str(folder / name), fsdp=False) for name, hkt in SETTINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--deepspeed", type=int, choices=[2, 3], default=0, help="ZeRO stage instead of FSDP2")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(cli.out)
    fsdp = dist.is_available() and dist.is_torchelastic_launched()
    results = {
        name: run(name, SETTINGS[name], cli.per_device_batch, str(out.parent / name), fsdp, cli.deepspeed)
        for name in cli.settings
    }
    if not (dist.is_initialized() and dist.get_rank() != 0):
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
