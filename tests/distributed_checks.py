"""Checks shared by the multi-process tests (DDP, FSDP2, DeepSpeed): a 2-process run against the 1-process run
with the same global batch and seed. `one` and `two` are one setting's results from the workers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import ViTForImageClassification

from helpers import tiny_vit
from hkt_hf.adapter import ADAPTER_WEIGHTS_NAME

# Both runs add the same per-sample fp32 losses and gradients, only in a different order (one batch mean versus
# two half-batch means averaged by the all-reduce): each sum differs by a few float32 ulps (eps = 1.2e-7, the
# losses are ~3), and 4 Adam steps keep it there (measured: at most 2.4e-7). 1e-5 leaves a 40x margin and is still
# ~1000x below the step-to-step change of the loss, which the test also checks.
LOSS_TOLERANCE = 1e-5
# Saved weights after 4 Adam steps: Adam divides each gradient by its running RMS, so the float32 rounding differences
# that the loss tolerance covers (a few ulps, from summing in another order) become larger in weights whose gradient
# is tiny. Measured: at most 5.9e-6 (FSDP2), 8.3e-6 (ZeRO-2/3), while training moves weights by up to 1.25e-2. 1e-4
# leaves a 12x margin and is still 100x below that movement (checked below, so the comparison is not vacuous).
WEIGHT_TOLERANCE = 1e-4


def assert_parent_untouched(two: dict, partitioned: bool = False) -> None:
    """Frozen, unchanged and given back as it was; whole on each process unless `partitioned` (ZeRO-3, FSDP2)."""
    assert two["parent_params_sharded"] == partitioned
    assert two["parent_requires_grad_as_given"] and two["parent_grads"] == 0
    assert two["parent_changed"] == 0.0


def assert_parent_halved(two: dict, by: str) -> None:
    """Rank 0 of 2 holds its half of every parent parameter and no whole copy between steps, so a parent larger than
    one device fits in the sum of them: ZeRO-3 a flat slice of ceil(numel / 2) elements, FSDP2 the first
    ceil(rows / 2) rows of dim 0 (a parameter of one row, such as ViT's class token, stays on rank 0)."""
    partitions = two["parent_partitions"]
    assert partitions and partitions["by"] == by, partitions
    for numel, rows, local, whole in partitions["params"]:
        half = math.ceil(numel / 2) if by == "zero3" else math.ceil(rows / 2) * (numel // rows)
        assert (local, whole) == (half, 0), partitions
    total = sum(numel for numel, _, _, _ in partitions["params"])
    assert sum(local for _, _, local, _ in partitions["params"]) < 0.55 * total


def assert_same_trajectory(one: dict, two: dict) -> None:
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) >= 4
    assert one["losses"] == pytest.approx(two["losses"], abs=LOSS_TOLERANCE)
    steps = torch.tensor(one["losses"]).diff().abs()
    assert steps.min() > 100 * LOSS_TOLERANCE, "the loss barely moves, so the comparison would prove nothing"
    for logs_one, logs_two in zip(one["hkt_logs"], two["hkt_logs"]):
        assert logs_one.keys() == logs_two.keys() and logs_one
        assert logs_one == pytest.approx(logs_two, abs=LOSS_TOLERANCE)
    # The learned lambdas moved from their 0.6 start, identically: their gradients, computed after the child's own
    # forward, were reduced across the processes.
    assert two["lambda"] and all(abs(lam - 0.6) > 10 * LOSS_TOLERANCE for lam in two["lambda"])
    assert one["lambda"] == pytest.approx(two["lambda"], abs=LOSS_TOLERANCE)


def assert_saved_plain_child_like_one_process(one: dict, two: dict) -> None:
    with safe_open(Path(two["saved"]) / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not [k for k in keys if "hkt_adapter" in k]
    assert (Path(two["saved"]) / "hkt_config.json").is_file()
    model_one = ViTForImageClassification.from_pretrained(one["saved"])
    model_two, info = ViTForImageClassification.from_pretrained(two["saved"], output_loading_info=True)
    assert not any(info.values()), info
    trained, start = model_two.state_dict(), tiny_vit(16, layers=2, seed=2).state_dict()  # the worker's child
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * WEIGHT_TOLERANCE
    for name, value in model_one.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=WEIGHT_TOLERANCE, rtol=0, msg=name)


def assert_checkpoint_adapter_like_one_process(one: dict, two: dict) -> None:
    """A checkpoint written while the adapter is attached holds its whole state (gathered from ZeRO-3 partitions or
    FSDP2 shards, not this rank's slice), equal to the 1-process run's: what an exact resume reads."""
    states = []
    for run in (one, two):
        with safe_open(Path(run["checkpoint"]) / ADAPTER_WEIGHTS_NAME, "pt") as weights:
            states.append({key: weights.get_tensor(key) for key in weights.keys()})
    adapter_one, adapter_two = states
    assert adapter_one and adapter_one.keys() == adapter_two.keys()
    for key, value in adapter_one.items():
        assert adapter_two[key].shape == value.shape, key
        torch.testing.assert_close(adapter_two[key], value, atol=WEIGHT_TOLERANCE, rtol=0, msg=key)


def assert_resume_continues_the_run(two: dict) -> None:
    """Resumed from the middle checkpoint under the same sharding, the run logs the uninterrupted run's losses after
    that point and ends with its child, bit for bit (measured: equal under 1 process, FSDP2, ZeRO-2 and ZeRO-3):
    the checkpoint held the child's, adapter's, optimizer's and scheduler's whole state."""
    resumed = two["resumed"]
    assert len(resumed["losses"]) == len(two["losses"]) // 2 >= 2
    assert resumed["losses"] == two["losses"][len(resumed["losses"]):]
    uninterrupted = ViTForImageClassification.from_pretrained(two["saved"]).state_dict()
    for name, value in ViTForImageClassification.from_pretrained(resumed["saved"]).state_dict().items():
        assert torch.equal(value, uninterrupted[name]), name
