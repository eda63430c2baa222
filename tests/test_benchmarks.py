"""Smoke tests of the benchmarks: the CIFAR-10 scripts' `--quick` runs end to end on the real shared data, the
language-model step cost on its smallest sizes, and the tensor pipeline they train on matches the package's image
processor. Timing ratios are only checked to be positive finite numbers (noisy CPU), never compared to a target.
The step-cost scripts compare against peer libraries (the `bench` extra, part of `dev`); without them those tests
are skipped.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import CifarTensors, normalise  # noqa: E402
from helpers import needs_shared, one_torch_thread  # noqa: E402

from hkt_hf.models import cifar_image_processor  # noqa: E402


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_normalise_matches_the_image_processor(random_image):
    expected = cifar_image_processor()(Image.fromarray(random_image), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(normalise(random_image), expected, atol=1e-5, rtol=1e-5)


def test_cifar_tensors_augment_only_the_training_rows(random_image):
    images, labels = np.stack([random_image] * 4), np.arange(4)
    test_rows = CifarTensors(images, labels, train=False)
    torch.testing.assert_close(test_rows[2]["pixel_values"], normalise(random_image))
    assert test_rows[2]["labels"] == 2
    torch.manual_seed(0)
    train_rows = [CifarTensors(images, labels, train=True)[0]["pixel_values"] for _ in range(8)]
    assert all(t.shape == (3, 32, 32) for t in train_rows)
    assert any(not torch.equal(t, normalise(random_image)) for t in train_rows)
    with pytest.raises(ValueError, match="as many images as labels"):
        CifarTensors(images, labels[:3], train=True)


def positive_finite(result: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])


@needs_shared
def test_step_cost_quick_reports_every_key():
    pytest.importorskip("torchdistill", reason="step_cost.py compares against torchdistill: pip install -e '.[bench]'")
    last = run_script(str(BENCHMARKS / "step_cost.py"), "--quick").strip().splitlines()[-1]
    result = json.loads(last)
    positive_finite(result, "hkt_over_peer_kd", "hkt_kd_over_peer_kd", "hkt_over_reference", "saved_hkt_over_peer_kd",
                    "export_latency_ratio")
    assert result["params_exported_child"] == result["params_plain_child"] > 0
    assert set(result["step_s"]) == {"child", "torchdistill_kd", "hkt_kd", "hkt", "reference"}
    check = result["kd_loss_check"]
    assert math.isfinite(check["torchdistill"]) and math.isfinite(check["hkt_hf"])
    # The reference step keeps both parent passes' activations for backward: far more than HKT.
    assert result["saved_mib"]["reference"] > 2 * result["saved_mib"]["hkt"]


def test_step_cost_lm_quick_reports_every_key(tmp_path):
    pytest.importorskip("trl", reason="step_cost_lm.py compares against TRL: pip install -e '.[bench]'")
    out = tmp_path / "lm.json"
    last = run_script(str(BENCHMARKS / "step_cost_lm.py"), "--quick", "--repeats", "1", "--phase-repeats", "1",
                      "--out", str(out)).strip().splitlines()[-1]
    result = json.loads(last)
    assert json.loads(out.read_text()) == result and out.with_suffix(".md").exists()
    methods = {"child", "gkd", "chunked", "hkt_kd", "hkt_lm_head", "hkt_layer"}
    assert set(result["step_s"]) | set(result["errors"]) == methods
    keys = ("hkt_lm_over_peer", "hkt_kd_lm_over_peer", "saved_mib_hkt_lm_over_peer", "hkt_layer_lm_over_peer",
            "chunked_over_peer")
    assert set(keys) <= set(result)
    positive_finite(result, *keys)
    assert result["errors"] == {}
    # GKD keeps full [batch, seq, vocab] tensors for backward; TRL's chunked loss recomputes its tiles instead.
    assert result["saved_vocab_tensors"]["gkd"] >= 1 and result["saved_vocab_tensors"]["chunked"] == 0


@needs_shared
def test_cifar10_quick_writes_resumable_results(tmp_path):
    script = str(BENCHMARKS / "cifar10.py")
    run_script(script, "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "cifar10.json").read_text())
    assert set(results["runs"]) == {"child/seed0", "kd/seed0", "hkt/seed0"}
    for key, run in results["runs"].items():
        assert key == f"{run['method']}/seed{run['seed']}"
        assert 0.0 <= run["test_accuracy"] <= 100.0
        assert run["train_s"] > 0
    assert "hkt/classifier:input=classifier:input/gate_mean" in results["runs"]["hkt/seed0"]["logs"]
    ref = results["reference"]
    for value in (ref["pretrained-child"], ref["pretrained-parent"], ref["adapted-parent"]["test_accuracy"]):
        assert 0.0 <= value <= 100.0
    assert results["recipe"]["steps"] > 0 and results["commands"][0]["wall_s"] > 0
    table = (tmp_path / "cifar10.md").read_text()
    assert "| 1 |" in table  # the seed count of each row
    assert (tmp_path / "cifar10.png").stat().st_size > 0
    assert "HKT ResNet-20" in (tmp_path / "hkt-resnet20-cifar10-jpeg.md").read_text()

    again = run_script(script, "--quick", "--out", str(tmp_path))
    assert "skip child/seed0" in again and "skip hkt/seed0" in again
    assert json.loads((tmp_path / "cifar10.json").read_text())["runs"] == results["runs"]


LM_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "python-stdlib"


def assert_hub_card(path: Path, tag: str) -> None:
    """Metadata the Hub checks on push, parsed as huggingface_hub parses it: the corpus's PSF license, which is not a
    Hub license identifier, given the Hub's way (`other` with a name and a link); a model index that parses."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(path).data
    assert (data.license, data.license_name) == ("other", "psf-2.0") and data.license_link.startswith("https://")
    assert data.library_name == "transformers" and tag in data.tags
    assert data.eval_results is None or all(r.metric_value is not None for r in data.eval_results)


@pytest.mark.skipif(not (LM_CORPUS / "train.parquet").is_file(),
                    reason=f"needs the python-stdlib corpus in ../shared ({LM_CORPUS}), absent here")
def test_language_model_quick_writes_resumable_results(tmp_path, capsys):
    """In-process and four of the methods (plain, KD, two carriers, a trainable gate), to stay under a minute on a
    busy 2-core machine; the re-run skips the finished runs."""
    import language_model

    out, cache = tmp_path / "results", tmp_path / "cache"
    methods = ["child", "kd", "hkt-layers", "hkt-learned"]
    with one_torch_thread():
        language_model.main(["--quick", "--out", str(out), "--cache", str(cache), "--methods", *methods])
    results = json.loads((out / "language_model.json").read_text())
    assert set(results["runs"]) == {f"{m}/seed0" for m in methods}
    for run in results["runs"].values():
        assert math.isfinite(run["test_perplexity"]) and run["test_perplexity"] > 1 and run["train_s"] > 0
        assert len(run["validation_curve"]) == results["recipe"]["steps"] // results["recipe"]["eval_every"]
        assert bool(run["gates"]) == run["method"].startswith("hkt")
    gates = results["runs"]["hkt-learned/seed0"]["gates"]["lm_head:input=lm_head:input"]
    assert 0.0 <= gates["gate_mean"][-1][1] <= 1.0 and gates["mix_weight_mean"][-1][1] >= 0.0
    assert set(results["runs"]["hkt-layers/seed0"]["gates"]) == {"model.layers.2=model.layers.0"}
    assert results["reference"]["parent"]["test_perplexity"] > 1
    assert "| 1 |" in (out / "language_model.md").read_text()
    assert (out / "language_model.png").stat().st_size > 0
    best = cache / "best-child-results"
    assert (best / "config.json").is_file() and (best / "README.md").is_file()
    assert "hkt-parent" in (Path(results["reference"]["parent"]["folder"]) / "README.md").read_text()
    assert_hub_card(best / "README.md", "llama")
    assert_hub_card(Path(results["reference"]["parent"]["folder"]) / "README.md", "hkt-parent")

    capsys.readouterr()
    with one_torch_thread():
        language_model.main(["--quick", "--out", str(out), "--cache", str(cache), "--methods", "child", "kd"])
    again = capsys.readouterr().out
    assert "skip child/seed0" in again and "skip kd/seed0" in again
    assert json.loads((out / "language_model.json").read_text())["runs"] == results["runs"]
