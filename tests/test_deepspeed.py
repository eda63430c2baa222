"""DeepSpeed ZeRO-2 and ZeRO-3: HKTTrainer with the Trainer's `deepspeed=` config on 2 CPU processes (torchrun, gloo,
DeepSpeed's CPU accelerator) against 1 plain process, with the worker, settings and checks of the FSDP2 test.

The Trainer hands the child (with `hkt_adapter`) to a `DeepSpeedEngine`, whose forward runs the whole HKT objective
(`HKTTrainer._run_objective`); the parent stays outside it, whole and frozen. Under ZeRO-3 every child and adapter
parameter is partitioned (the worker sets `stage3_param_persistence_threshold` to 0, else these tiny parameters would
all stay whole), so the child's forward, the head replay, the truncated passes and the aligners and gates gather
their parameters through ZeRO-3's hooks. No C++ op is built: see `DEEPSPEED_SHM_OP` in `fsdp_worker.py`.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from dist_worker import GLOBAL_BATCH, SETTINGS
from fsdp_worker import one_process_runs
from helpers import torchrun_in_background
from distributed_checks import assert_checkpoint_adapter_like_one_process, assert_resume_continues_the_run, assert_parent_halved, assert_parent_untouched, assert_same_trajectory, assert_saved_plain_child_like_one_process

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
STAGES = [2, 3]
CASES = [(stage, setting) for stage in STAGES for setting in SETTINGS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both ZeRO runs (2 processes each) in the background while the 1-process reference runs in this process."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    out = {stage: tmp / f"zero{stage}" / "out.json" for stage in STAGES}
    with ExitStack() as launches:
        for stage in STAGES:
            launches.enter_context(torchrun_in_background(
                WORKER, out[stage], "--per-device-batch", str(GLOBAL_BATCH // 2), "--deepspeed", str(stage)
            ))
        one = one_process_runs(tmp / "one")
    return {"one": one, **{stage: json.loads(out[stage].read_text()) for stage in STAGES}}


def one_and_two(runs: dict, stage: int, setting: str) -> tuple[dict, dict]:
    return runs["one"][setting], runs[stage][setting]


@pytest.mark.parametrize("stage, setting", CASES)
def test_deepspeed_engine_runs_zero_and_partitions_the_child_with_its_adapter(runs, stage, setting):
    one, two = one_and_two(runs, stage, setting)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["distributed_type"], two["distributed_type"]) == ("DistributedType.NO", "DistributedType.DEEPSPEED")
    zero = two["zero"]
    assert (zero["engine"], zero["stage"]) == ("DeepSpeedEngine", stage)
    assert not two["adapter_in_child_after_train"]
    total = zero["trainable_numel"]
    if stage == 3:
        assert zero["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        assert two["child_params_sharded"] and two["adapter_params_sharded"]  # every parameter carries a `ds_id`
        # Each parameter: this rank holds its half (rounded up) and, outside forward, no full copy.
        assert zero["param_numel"] and all(
            local == math.ceil(whole / 2) and data == 0 for whole, local, data in zero["param_numel"]
        ), zero["param_numel"]
        assert sum(whole for whole, _, _ in zero["param_numel"]) == total
    else:
        assert zero["optimizer"] == "DeepSpeedZeroOptimizer"
        assert not two["child_params_sharded"] and not two["adapter_params_sharded"]  # ZeRO-2 keeps them whole
        # The fp32 master weights (and Adam's state beside them) of child and adapter: half on each rank, plus the
        # padding of each of the Trainer's two parameter groups (decay / no decay) to DeepSpeed's alignment.
        assert total / 2 <= zero["fp32_partition_numel"] <= total / 2 + 8, (zero, total)


@pytest.mark.parametrize("stage, setting", CASES)
def test_parent_is_frozen_unchanged_and_partitioned_only_under_zero3(runs, stage, setting):
    """ZeRO-3 partitions the parent like the child (a parent larger than one device fits in the sum of them):
    each process holds half of every parameter and no whole copy outside a forward, and the trajectory test below
    shows the loss is still the one process's. ZeRO-2 keeps the parent whole on each process."""
    two = one_and_two(runs, stage, setting)[1]
    assert_parent_untouched(two, partitioned=stage == 3)
    if stage == 3:
        assert_parent_halved(two, "zero3")
    else:
        assert two["parent_partitions"] is None and not two["parent_is_fsdp"]


@pytest.mark.parametrize("stage, setting", CASES)
def test_zero_follows_the_one_process_trajectory(runs, stage, setting):
    """Same global batches and maths as 1 process (per-process batch 4 against 8, fp32): loss and every `hkt/*` log
    within `LOSS_TOLERANCE` (measured: at most 2.4e-7), learned lambdas moved and equal (their gradients, computed
    after the child's own forward but inside the engine's, were reduced)."""
    assert_same_trajectory(*one_and_two(runs, stage, setting))


@pytest.mark.parametrize("stage, setting", CASES)
def test_zero_child_saves_as_a_plain_model_equal_to_the_one_process_child(runs, stage, setting):
    """`save_model` gathers the child (under ZeRO-3 with `stage3_gather_16bit_weights_on_model_save`, which keeps
    fp32 here) without the adapter; measured: within 8.3e-6 of the 1-process child."""
    assert_saved_plain_child_like_one_process(*one_and_two(runs, stage, setting))


@pytest.mark.parametrize("stage, setting", CASES)
def test_zero_checkpoint_holds_the_whole_adapter_state(runs, stage, setting):
    """Under ZeRO-3 each rank holds a slice of the adapter; the checkpoint's adapter file is gathered whole."""
    assert_checkpoint_adapter_like_one_process(*one_and_two(runs, stage, setting))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_zero_resume_continues_the_run(runs, stage, setting):
    """DeepSpeed saves and loads its own engine checkpoint (partitioned optimizer state); HKT's adapter file is
    loaded before the engine is made."""
    assert_resume_continues_the_run(runs[stage][setting])


def test_parent_zero3_config_drops_the_training_blocks_and_sizes_auto_buckets_from_the_parent():
    """The parent's engine gets the run's config without optimizer, scheduler and optimizer offload (it has nothing
    to optimise), and the size-dependent "auto" values from the parent's hidden size (transformers would fill them
    from the child's, at train time); the run's own config is left as it was."""
    from helpers import tiny_vit
    from hkt_hf.sharding import parent_zero3_config

    run = {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "train_batch_size": 8,
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": "auto",
                                 "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}}
    config = parent_zero3_config(run, tiny_vit(32))
    assert config == {"train_batch_size": 8, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": 32 * 32, "stage3_prefetch_bucket_size": int(0.9 * 32 * 32),
        "stage3_param_persistence_threshold": 320}}
    assert run["optimizer"] and run["zero_optimization"]["reduce_bucket_size"] == "auto"
    sizeless = parent_zero3_config(run, torch.nn.Linear(2, 2))  # no config: DeepSpeed's defaults
    assert sizeless["zero_optimization"] == {"stage": 3}


def test_a_parent_partitioned_while_loading_is_checked_and_fingerprinted_whole(tmp_path):
    """A parent named by path under ZeRO-3 is partitioned by `from_pretrained` (`zero.Init`), so each process holds
    half of each parameter when the trainer reads it: its fingerprint is the whole weights' and a NaN in one weight
    is refused, as without DeepSpeed."""
    out = tmp_path / "out.json"
    with torchrun_in_background(Path(__file__).resolve().parent / "zero3_parent_worker.py", out):
        pass
    result = json.loads(out.read_text())
    assert result["recorded"] == result["whole"] and result["whole"] is not None
    assert result["refused"] and "non-finite values (NaN or inf) in 'vit.layers.1.attention.q_proj.weight'" in \
        result["refused"]
