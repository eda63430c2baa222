"""DDP: HKTTrainer on 2 CPU processes (gloo, launched by torchrun) against 1 process with the same global batch.

The parent stays outside DDP; the aligners and learned gates live in the wrapped child and must be synchronised,
with no "unused parameter" or "marked ready twice" errors (the default `find_unused_parameters=True` included).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_worker import GLOBAL_BATCH, SETTINGS, run
from distributed_checks import LOSS_TOLERANCE, assert_same_trajectory
from helpers import torchrun_in_background
from hkt_hf.model_state import forward_replaced

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> tuple[dict, dict]:
    """Launch the 2-process run in the background while the 1-process run goes on in this process."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "two.json"
    with torchrun_in_background(WORKER, out, "--per-device-batch", str(GLOBAL_BATCH // 2)):
        one = {name: run(name, hkt, GLOBAL_BATCH, str(tmp / name), bf16=False) for name, hkt in SETTINGS.items()}
    return one, json.loads(out.read_text())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_processes_follow_the_one_process_trajectory(one_and_two_processes, setting):
    assert_same_trajectory(*(runs[setting] for runs in one_and_two_processes))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_adapter_is_trained_and_identical_on_both_ranks(one_and_two_processes, setting):
    one, two = (runs[setting] for runs in one_and_two_processes)
    assert two["child_rank_diff"] == 0.0
    assert two["adapter_rank_diff"] == 0.0
    # The learned lambda moved away from its 0.6 start, identically with 1 and 2 processes: its gradient was
    # computed outside the child's own forward and still all-reduced.
    assert two["lambda"] and all(abs(lam - 0.6) > 10 * LOSS_TOLERANCE for lam in two["lambda"])
    assert one["lambda"] == pytest.approx(two["lambda"], abs=LOSS_TOLERANCE)


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_forward_replaced_runs_the_function_once_and_restores_an_instance_forward():
    module = Doubler()
    wrapper = module.forward  # stands in for Accelerate's instance-level autocast forward
    module.forward = wrapper
    x = torch.ones(2)

    def step() -> torch.Tensor:
        return module(x) + 1  # the module's real forward, not `step` again

    with forward_replaced(module, step):
        assert torch.equal(nn.Sequential(module)(torch.zeros(2)), torch.full((2,), 3.0))
    assert module.__dict__["forward"] is wrapper
    plain = Doubler()
    with forward_replaced(plain, lambda: "replaced"):
        assert plain(x) == "replaced"
    assert "forward" not in plain.__dict__ and torch.equal(plain(x), 2 * x)
