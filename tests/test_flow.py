"""Optical flow: torchvision's RAFT as a transformers model, known-warp data with exact flow, EPE, HKT with two
and three carriers through HKTTrainer, and the example's quick run (and its resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from helpers import import_example
from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.lineage import read_lineage
from hkt_hf.parent import frozen
from hkt_hf.apps.data.images import load_image_dataset
from hkt_hf.apps.data.optical_flow import KnownWarpFlow
from hkt_hf.apps.metrics import evaluate_flow
from hkt_hf.apps.models import RaftConfig, RaftForOpticalFlow
from hkt_hf.apps.models.raft import OpticalFlowOutput, sequence_loss
from hkt_hf.losses import kd_loss

TWO = ["raft.feature_encoder=raft.feature_encoder", "raft.context_encoder=raft.context_encoder"]
THREE = [*TWO, "raft.feature_encoder.layer2=raft.feature_encoder.layer2"]


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    return load_image_dataset(str(cifar_dir))


@pytest.fixture(scope="module")
def pairs(cifar):
    return KnownWarpFlow(cifar["test"], 6, seed=7)


def raft(variant: str, seed: int = 0, iters: int = 2) -> RaftForOpticalFlow:
    torch.manual_seed(seed)
    return RaftForOpticalFlow(RaftConfig(variant=variant, num_flow_updates=iters))


# ---- the model ----------------------------------------------------------------------------------------------------


def test_raft_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant must be one of"):
        RaftConfig(variant="medium")
    with pytest.raises(ValueError, match="num_flow_updates"):
        RaftConfig(num_flow_updates=0)
    with pytest.raises(ValueError, match="loss_gamma"):
        RaftConfig(loss_gamma=1.5)


def test_raft_saves_and_loads_with_automodel(tmp_path, pairs):
    model = raft("small").eval()
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=2)))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is RaftForOpticalFlow and loaded.config.variant == "small"
    with torch.no_grad():
        out = model(image1=batch["image1"], image2=batch["image2"], labels=batch["labels"], valid=batch["valid"])
        again = loaded(image1=batch["image1"], image2=batch["image2"])
    assert isinstance(out, OpticalFlowOutput) and len(out.flow_predictions) == 2
    assert out.predicted_flow.shape == batch["labels"].shape and torch.isfinite(out.loss)
    torch.testing.assert_close(again.predicted_flow, out.predicted_flow, rtol=0, atol=0)


def test_raft_sizes_are_the_papers_pair():
    assert raft("large").num_parameters() == 5_257_536  # torchvision's raft_large
    assert raft("small").num_parameters() == 990_162  # raft_small


def test_sequence_loss_by_hand():
    gt = torch.zeros(1, 2, 1, 2)
    gt[0, 0, 0, 1] = 500.0  # longer than max_flow: left out
    first, last = torch.ones(1, 2, 1, 2), torch.full((1, 2, 1, 2), 2.0)
    valid = torch.tensor([[[True, True]]])
    # Only pixel 0 counts: |1-0|+|1-0| = 2 for the first prediction, 4 for the last; gamma 0.5 weighs the first 0.5.
    assert sequence_loss([first, last], gt, valid, gamma=0.5, max_flow=400).item() == pytest.approx(0.5 * 2 + 4)
    valid[0, 0, 0] = False  # no valid pixel left: zero loss, not NaN
    assert sequence_loss([first, last], gt, valid, gamma=0.5).item() == 0.0


# ---- the data -----------------------------------------------------------------------------------------------------


def backward_warp_error(item: dict, flow: torch.Tensor) -> float:
    """Mean |image2(x + flow(x)) - image1(x)| over valid pixels: small only if `flow` is the motion between them."""
    size = item["image1"].shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grid = torch.stack([(xs + flow[0]) * 2 / (size - 1) - 1, (ys + flow[1]) * 2 / (size - 1) - 1], -1)
    warped = F.grid_sample(item["image2"][None], grid[None].float(), align_corners=True)[0]
    return (warped - item["image1"]).abs().mean(0)[item["valid"]].mean().item()


def test_known_warp_pairs_are_exact_and_reproducible(cifar, pairs):
    again = KnownWarpFlow(cifar["test"], 3, seed=7)
    for i in range(3):
        item = pairs[i]
        assert item["image1"].shape == item["image2"].shape == (3, 128, 128) and item["labels"].shape == (2, 128, 128)
        assert item["valid"].dtype == torch.bool and 0.5 < item["valid"].float().mean() <= 1
        assert item["image1"].min() >= -1 and item["image1"].max() <= 1
        assert all(torch.equal(item[k], again[i][k]) for k in item)  # same seed, any number of pairs: same pair
        true = backward_warp_error(item, item["labels"])
        # The true flow explains frame 2 far better than no motion or a flow 2 px off (error left: occlusions and
        # bilinear resampling).
        assert true < 0.5 * backward_warp_error(item, torch.zeros_like(item["labels"]))
        assert true < 0.5 * backward_warp_error(item, item["labels"] + 2.0)
        assert item["labels"].norm(dim=0).max() > 3  # real motion
    assert not torch.equal(pairs[0]["labels"], pairs[1]["labels"])
    assert not torch.equal(pairs[0]["image1"], KnownWarpFlow(cifar["test"], 1, seed=8)[0]["image1"])


def test_known_warp_flow_rejects_small_frames(cifar):
    with pytest.raises(ValueError, match="at least 128"):
        KnownWarpFlow(cifar["test"], 1, seed=0, size=64)


class ZeroFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, image1, image2):
        return OpticalFlowOutput(predicted_flow=image1.new_zeros(image1.shape[0], 2, *image1.shape[2:]))


def test_end_point_error_of_a_zero_flow_is_the_mean_motion(pairs):
    metrics = evaluate_flow(ZeroFlow(), pairs, batch_size=4)
    lengths = torch.cat([pairs[i]["labels"].norm(dim=0)[pairs[i]["valid"]] for i in range(len(pairs))])
    assert metrics["epe"] == pytest.approx(lengths.double().mean().item(), rel=1e-6)
    assert metrics["3px"] == pytest.approx(100 * (lengths < 3).double().mean().item())


# ---- KD for regressions -------------------------------------------------------------------------------------------


def test_regression_kd_losses_by_hand(tmp_path):
    child, parent = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert kd_loss(child, parent, 4.0, "l1").item() == pytest.approx(2.0)
    assert kd_loss(child, parent, 4.0, "mse").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="hkt_kd_loss must be one of"):
        HKTTrainingArguments(tmp_path, hkt_kd_loss="huber")


# ---- HKT ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carriers", [TWO, THREE], ids=["two-carriers", "three-carriers"])
def test_hkt_trains_raft_small_from_raft_with_several_carriers(tmp_path, pairs, carriers):
    parent, child = raft("large", seed=1), raft("small", seed=2)
    parent_before = {k: v.clone() for k, v in parent.state_dict().items()}
    child_before = child.raft.feature_encoder.convnormrelu[0].weight.clone()
    args = HKTTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to="none", save_strategy="no", logging_steps=1, remove_unused_columns=False, disable_tqdm=True,
        hkt_carriers=carriers, hkt_kd_weight=0.5, hkt_kd_loss="l1",
    )
    trainer = HKTTrainer(child, args, train_dataset=pairs, parent_model=parent)
    # The feature-encoder gate is one value per position of the 1/8 map of both frames (batch 2 -> 4 maps).
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=2)))
    adapter = trainer.hkt_adapter
    with torch.no_grad(), frozen(parent, "eval"):  # as the trainer runs each step
        result = trainer._objective(child, adapter, batch, trainer._native_loss)
    assert result.gates[carriers[0]].gate.shape == (4, 16, 16)
    if len(carriers) == 3:
        assert result.gates[carriers[2]].gate.shape == (4, 32, 32)  # layer2 works at 1/4 resolution
    trainer.train()
    log = trainer.state.log_history[0]
    for name in ("native", "child_mixed", "parent_head", "kd"):
        assert torch.isfinite(torch.tensor(log[f"hkt/loss_{name}"]))
    assert sum(k.endswith("/gate_mean") for k in log) == len(carriers)
    assert not torch.equal(child.raft.feature_encoder.convnormrelu[0].weight, child_before)
    assert all(torch.equal(parent.state_dict()[k], v) for k, v in parent_before.items())
    trainer.save_model(str(tmp_path / "child"))
    loaded = AutoModel.from_pretrained(tmp_path / "child")
    assert type(loaded) is RaftForOpticalFlow and loaded.config.variant == "small"
    assert not any("hkt_adapter" in k for k in loaded.state_dict())
    assert read_lineage(tmp_path / "child" / "hkt_config.json")["hkt_carriers"] == carriers
    trainer.args.output_dir = str(tmp_path / "child")
    trainer.create_model_card(model_name="hkt-raft-small")
    card = (tmp_path / "child" / "README.md").read_text()
    # transformers has no AutoModelForOpticalFlow: the card must name the Auto class that loads it.
    assert "AutoModel.from_pretrained(" in card and "AutoModelForOpticalFlow" not in card


# ---- the example --------------------------------------------------------------------------------------------------


def test_optical_flow_example_quick_run_and_resume(tmp_path, monkeypatch, capsys, cifar_dir):
    example = import_example("optical_flow", monkeypatch)
    out = tmp_path / "metrics.json"
    argv = ["--quick", "--images", str(cifar_dir), "--output_dir", str(tmp_path / "runs"), "--json", str(out)]
    result = example.main(argv)
    assert [r["method"] for r in result["runs"]] == ["alone", "kd", "hkt-2", "hkt-3"]
    for run in result["runs"]:
        assert run["epe"] > 0 and 0 <= run["1px"] <= run["3px"] <= run["5px"] <= 100
    assert len(result["runs"][2]["gates"]) == 2 * 2 and len(result["runs"][3]["gates"]) == 2 * 3
    assert result["parent"]["params"] > 5 * result["child_params"]
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == result["runs"]
    # A second run with the same settings trains nothing: the parent comes from the cache, the runs from the log.
    again = example.main(argv)
    assert again["runs"] == result["runs"]
    assert "Loading the cached parent" in capsys.readouterr().err
