"""FSDP2: HKTTrainer through Accelerate's FSDP2 path on 2 CPU processes (gloo, torchrun) against 1 plain process.

The child (with `hkt_adapter`) is `fully_shard`-ed in place by Accelerate; the objective runs after the root's
forward (there is no wrapper), with carrier hooks on FSDP units, a head replay and truncated passes through them.
The parent is `fully_shard`-ed in the same units (each process holds half of it), frozen and unchanged. See `fsdp_worker.py` for why a small shim is needed on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_worker import GLOBAL_BATCH, SETTINGS
from fsdp_worker import one_process_runs
from distributed_checks import assert_checkpoint_adapter_like_one_process, assert_resume_continues_the_run, assert_parent_halved, assert_parent_untouched, assert_same_trajectory, assert_saved_plain_child_like_one_process
from helpers import torchrun_in_background
from hkt_hf.mixture import LearnedGate

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> tuple[dict, dict]:
    """Run the 2-process FSDP2 run in the background while the 1-process run goes on in this process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = tmp / "two" / "out.json"
    with torchrun_in_background(WORKER, out, "--per-device-batch", str(GLOBAL_BATCH // 2)):
        one = one_process_runs(tmp / "one")
    return one, json.loads(out.read_text())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fsdp2_runs_and_shards_the_child_with_its_adapter(one_and_two_processes, setting):
    one, two = (runs[setting] for runs in one_and_two_processes)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["distributed_type"], two["distributed_type"]) == ("DistributedType.NO", "DistributedType.FSDP")
    # Accelerate's fsdp2_prepare_model: the layers, the patch embedding, the final norm and the root (head + adapter).
    assert two["fsdp_units"] == ["", "vit.embeddings.patch_embeddings", "vit.layernorm", "vit.layers.0", "vit.layers.1"]
    assert two["child_params_sharded"] and two["adapter_params_sharded"]
    assert not two["adapter_in_child_after_train"]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parent_is_sharded_in_the_same_units_frozen_and_unchanged(one_and_two_processes, setting):
    """The parent is sharded like the child (a parent larger than one device fits in the sum of them); the head
    replay and the truncated passes ran on it (the trajectory test below: the loss is the one process's)."""
    two = one_and_two_processes[1][setting]
    assert two["parent_is_fsdp"] and two["parent_fsdp_units"] == two["fsdp_units"]
    assert_parent_untouched(two, partitioned=True)
    assert_parent_halved(two, "fsdp2")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_fsdp_processes_follow_the_one_process_trajectory(one_and_two_processes, setting):
    """Same global batches and maths as 1 process: the hooks captured and replaced features on FSDP units (the
    two-carrier setting hooks `vit.layers.0`, an FSDP unit), the head replay and the truncated passes saw unsharded
    weights, and the adapter's gradients were reduce-scattered (else the shards would drift apart). The learned
    lambda is a parameter of the root FSDP group used only after the root's forward."""
    assert_same_trajectory(*(runs[setting] for runs in one_and_two_processes))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fsdp_child_saves_as_a_plain_model_equal_to_the_one_process_child(one_and_two_processes, setting):
    assert_saved_plain_child_like_one_process(*(runs[setting] for runs in one_and_two_processes))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fsdp_checkpoint_holds_the_whole_adapter_state(one_and_two_processes, setting):
    assert_checkpoint_adapter_like_one_process(*(runs[setting] for runs in one_and_two_processes))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fsdp_resume_continues_the_run(one_and_two_processes, setting):
    for runs in one_and_two_processes:  # 1 plain process and 2 FSDP2 processes
        assert_resume_continues_the_run(runs[setting])


def test_learned_gate_lambda_is_one_dimensional():
    # fully_shard refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"), so lam_logit has shape [1].
    gate = LearnedGate(4, 0.6)
    assert gate.lam_logit.shape == (1,)
