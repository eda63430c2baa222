"""Tests of the benchmark harness and smoke tests of the benchmarks.

The harness (`benchmarks/harness.py`): the results log resumes (a finished run is never run again), refuses a log of
another recipe, holds relative paths only (and so do the committed results), and records the commit of every run.
The step-cost scripts' `--quick` mode times what the full run times. The benchmarks and examples import nothing they
should not. Then the CIFAR-10 scripts end to end on the real shared data (`--quick`), the step-cost scripts on their
`--smoke` sizes, and the tensor pipeline they train on against the package's image processor. Timing ratios are only
checked to be positive finite numbers (noisy CPU), never compared to a target. The step-cost scripts compare against
peer libraries (the `bench` extra, part of `dev`); without them those tests are skipped.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import comparison  # noqa: E402
import harness  # noqa: E402
from common import CifarTensors, normalise  # noqa: E402
from helpers import needs_shared, one_torch_thread  # noqa: E402

import hkt_hf  # noqa: E402
from hkt_hf.apps.models import cifar_image_processor  # noqa: E402


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# ---- the results log ------------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_a_rerun_skips_the_finished_runs_and_runs_the_rest(tmp_path):
    """Through the loop the comparisons use: an interrupted comparison resumes after its last finished run."""
    calls = []

    def run(method: str, seed: int) -> dict:
        calls.append((method, seed))
        if (method, seed) == ("hkt", 1) and len(calls) < 5:
            raise KeyboardInterrupt  # interrupted in the middle of the fourth run
        return {"method": method, "seed": seed, "score": 10.0 * seed + len(method)}

    args = Namespace(output_dir=str(tmp_path), seeds=[0, 1], json=None, lr=0.1)
    with pytest.raises(KeyboardInterrupt):
        comparison.run_all(args, ["kd", "hkt"], run)
    assert calls == [("kd", 0), ("hkt", 0), ("kd", 1), ("hkt", 1)]
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["recipe", "run", "run", "run"]

    runs = comparison.run_all(args, ["kd", "hkt"], run)
    assert calls[4:] == [("hkt", 1)]  # only the unfinished run ran again
    assert [(r["method"], r["seed"]) for r in runs] == [("kd", 0), ("hkt", 0), ("kd", 1), ("hkt", 1)]
    assert comparison.run_all(args, ["kd", "hkt"], run) == runs and len(calls) == 5  # all finished: nothing runs
    log = harness.RunLog.read(tmp_path / "runs.jsonl")
    assert sorted(log.runs) == ["hkt/seed0", "hkt/seed1", "kd/seed0", "kd/seed1"]
    assert log.runs["kd/seed1"]["score"] == 12.0


def test_a_run_whose_line_was_cut_short_counts_as_unfinished(tmp_path):
    path = tmp_path / "b.jsonl"
    log = harness.RunLog.open(path, {"steps": 1})
    log.add_run("kd/seed0", method="kd", seed=0, score=1.0)
    with path.open("a") as f:
        f.write('{"kind": "run", "id": "hkt/seed0", "sco')  # killed while appending
    again = harness.RunLog.open(path, {"steps": 1})
    assert again.finished("kd/seed0") and not again.finished("hkt/seed0")
    again.add_run("hkt/seed0", method="hkt", seed=0, score=2.0)
    assert harness.RunLog.read(path).runs["hkt/seed0"]["score"] == 2.0
    path.write_text(path.read_text().replace('"kd/seed0"', '"kd/seed0', 1))  # a bad line in the middle: an error
    with pytest.raises(SystemExit, match=r"b\.jsonl:2 is not JSON"):
        harness.RunLog.read(path)


def test_a_log_of_another_recipe_is_refused_not_mixed(tmp_path):
    path = tmp_path / "bench.jsonl"
    log = harness.RunLog.open(path, {"steps": 10})
    log.add_run("child/seed0", method="child", seed=0, score=1.0)
    with pytest.raises(SystemExit, match=r"bench\.jsonl holds runs of another recipe"):
        harness.RunLog.open(path, {"steps": 20})
    assert harness.RunLog.open(path, {"steps": 10}).finished("child/seed0")
    (tmp_path / "other.jsonl").write_text('{"kind": "run", "id": "x"}\n')
    with pytest.raises(SystemExit, match="does not start with a recipe line"):
        harness.RunLog.read(tmp_path / "other.jsonl")


def test_references_and_commands_are_updated_by_later_lines(tmp_path):
    log = harness.RunLog.open(tmp_path / "b.jsonl", {"steps": 1})
    log.set_reference("parent", {"accuracy": 1.0})
    log.set_reference("parent", {"accuracy": 1.0})  # unchanged: no new line
    log.set_reference("parent", {"accuracy": 2.0})
    finish = log.start_command("benchmarks/b.py", ["--steps", "1"])
    finish()
    again = harness.RunLog.read(tmp_path / "b.jsonl")
    assert again.reference == {"parent": {"accuracy": 2.0}}
    (command,) = again.commands.values()
    assert command["argv"] == "python benchmarks/b.py --steps 1" and command["wall_s"] >= 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 1 + 2 + 2
    assert "benchmarks/b.py --steps 1" in harness.commands_line(again.commands.values())


@pytest.mark.parametrize("line", [
    {"folder": "/tmp/runs/hkt"},
    {"nested": {"paths": ["ok/relative", "/work/main/benchmarks/.cache"]}},
    {"argv": "python benchmarks/cifar10.py --out /tmp/q"},
    {"argv": "python benchmarks/cifar10.py --out=/tmp/q"},
    {"text": "written to `/home/user/out`."},
])
def test_the_log_refuses_absolute_paths(tmp_path, line):
    log = harness.RunLog.open(tmp_path / "b.jsonl", {"steps": 1})
    with pytest.raises(ValueError, match="relative paths only"):
        log.add_run("child/seed0", method="child", seed=0, **line)
    assert not log.finished("child/seed0") and "child" not in (tmp_path / "b.jsonl").read_text()


def test_paths_are_stored_relative_and_resolve_back(tmp_path):
    log = harness.RunLog.open(tmp_path / "results" / "b.jsonl", {"steps": 1})
    run_dir = tmp_path / "cache" / "runs" / "hkt" / "seed0"
    stored = log.relative(run_dir)
    assert stored == "../cache/runs/hkt/seed0" and log.resolve(stored) == run_dir.resolve()
    assert harness.relative(REPO / "benchmarks" / "results") == "benchmarks/results"
    argv = harness.relative_argv(["--out", str(REPO / "x"), f"--cache={REPO / 'y'}", "--seeds", "0"])
    assert argv == ["--out", "x", "--cache=y", "--seeds", "0"]
    log.start_command("benchmarks/b.py", ["--out", str(tmp_path / "results")])
    assert not harness.absolute_paths(harness.RunLog.read(log.path).commands)


def committed_results() -> list[Path]:
    return sorted(p for folder in (BENCHMARKS / "results", REPO / "model_cards") for p in folder.rglob("*")
                  if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".log", ".txt"))


def test_committed_results_hold_relative_paths_only():
    """Every results file, whatever wrote it: no path of the machine it ran on."""
    assert committed_results()
    found = {}
    for path in committed_results():
        text = path.read_text()
        hits = (harness.absolute_paths([json.loads(line) for line in text.splitlines() if line.strip()])
                if path.suffix == ".jsonl" else harness.absolute_paths(json.loads(text)) if path.suffix == ".json"
                else re.findall(r"(?<![\w.~])/(?:work|tmp|home|root|Users|private|var)/\S*", text))
        if hits:
            found[str(path.relative_to(REPO))] = hits[:3]
    assert not found, found


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "t@example.com")
    git(path, "config", "user.name", "t")
    for name in ("code.py", "benchmarks/results/table.md", "model_cards/card.md"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("v1\n")
    git(path, "add", ".")
    git(path, "commit", "-qm", "one")
    return path


def test_provenance_is_the_commit_and_whether_the_code_differs_from_it(tmp_path):
    repo = make_repo(tmp_path / "repo")
    head = git(repo, "rev-parse", "HEAD")
    assert harness.provenance(repo) == {"commit": head, "dirty": False}
    (repo / "benchmarks/results/table.md").write_text("v2\n")  # what the benchmarks write themselves
    (repo / "model_cards/card.md").write_text("v2\n")
    (repo / "new_untracked.py").write_text("x\n")
    assert harness.provenance(repo) == {"commit": head, "dirty": False}
    (repo / "code.py").write_text("v2\n")
    assert harness.provenance(repo) == {"commit": head, "dirty": True}
    assert harness.provenance(tmp_path) == {"commit": None, "dirty": None}  # not a checkout


def test_every_run_and_command_records_the_commit(tmp_path):
    expected = harness.provenance()
    assert re.fullmatch(r"[0-9a-f]{40}", expected["commit"])
    log = harness.RunLog.open(tmp_path / "b.jsonl", {"steps": 1})
    log.start_command("benchmarks/b.py", [])
    log.add_run("kd/seed0", method="kd", seed=0, score=1.0)
    lines = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["recipe", "command", "run"]
    for line in lines:
        assert (line["commit"], line["dirty"]) == (expected["commit"], expected["dirty"])
    assert log.runs["kd/seed0"]["finished"]


# ---- what the benchmarks and examples import --------------------------------------------------------------------


def imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def method_modules() -> set[str]:
    """The method's modules: those directly in hkt_hf/ (the applications are under hkt_hf/apps/)."""
    return {path.stem for path in (REPO / "hkt_hf").glob("*.py") if path.stem != "__init__"}


def test_benchmarks_import_nothing_from_examples():
    examples = {p.stem for p in (REPO / "examples").glob("*.py")}
    for path in BENCHMARKS.glob("*.py"):
        assert not re.search(r"""["']examples["']""", path.read_text()), f"{path} puts examples/ on a path"
        assert not imports(path) & examples, path


def test_examples_use_only_the_public_api_of_the_method():
    """An example may import `hkt_hf`'s public names and its applications, never a module of the method itself
    (except the public `hkt_hf.hub`)."""
    internal = {f"hkt_hf.{m}" for m in method_modules() - set(hkt_hf.__all__)}
    assert "hkt_hf.objective" in internal and "hkt_hf.losses" in internal
    for path in sorted((REPO / "examples").rglob("*.py")):
        used = {m for m in imports(path) if m.split(".")[:2] and ".".join(m.split(".")[:2]) in internal}
        assert not used, f"{path.relative_to(REPO)} imports the method's internals {used}"


# ---- step cost: quick measures what full measures ---------------------------------------------------------------


@pytest.mark.parametrize("script", ["step_cost", "step_cost_lm"])
def test_quick_step_cost_times_the_full_shapes_with_fewer_rounds(script):
    """What made quick runs disagree with full ones: other shapes (batch 16; a 2,000-token vocabulary) and fewer
    warm-up steps. Now only the number of rounds differs (the warm-up is one constant for every mode)."""
    modes = {name: asdict(mode) for name, mode in __import__(script).MODES.items()}
    shapes = lambda mode: {k: v for k, v in mode.items() if "repeats" not in k}  # noqa: E731
    assert shapes(modes["quick"]) == shapes(modes["full"]) and shapes(modes["smoke"]) != shapes(modes["full"])
    assert 3 <= modes["quick"]["repeats"] < modes["full"]["repeats"]


def test_ratios_are_paired_round_by_round_with_their_spread():
    import step_timing

    times = {"peer": [1.0, 2.0, 1.0, 4.0], "hkt": [1.1, 2.2, 0.9, 4.4]}  # the load doubles in some rounds
    result = step_timing.ratio_results(times, {"hkt_over_peer": ("hkt", "peer"), "missing": ("gone", "peer")})
    assert result["hkt_over_peer"] == pytest.approx(1.1) and result["missing"] is None
    spread = result["spread"]["hkt_over_peer"]
    assert (spread["min"], spread["max"], spread["rounds"]) == (pytest.approx(0.9), pytest.approx(1.1), 4)
    assert spread["q1"] <= spread["median"] <= spread["q3"]
    assert "4 rounds" in step_timing.spread_text(spread)
    order = list(step_timing.round_robin(["a", "b", "c"], 2))
    assert order == ["a", "b", "c", "c", "b", "a"]


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


def smoke_run(script: str, out: Path) -> dict:
    """A step-cost script's `--smoke` result: written as printed, with its table, the commit and a command without
    absolute paths, ratios with their spread."""
    result = json.loads(run_script(str(BENCHMARKS / script), "--smoke", "--out", str(out)).strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result and out.with_suffix(".md").exists()
    assert result["settings"]["mode"] == "smoke" and "its ratios mean nothing" in out.with_suffix(".md").read_text()
    assert result["commit"] == harness.provenance()["commit"] and isinstance(result["dirty"], bool)
    assert result["command"].startswith("python benchmarks/") and not harness.absolute_paths(result)
    assert all(s["rounds"] >= 1 and s["min"] <= s["median"] <= s["max"] for s in result["spread"].values())
    return result


@needs_shared
def test_step_cost_smoke_reports_every_key(tmp_path):
    pytest.importorskip("torchdistill", reason="step_cost.py compares against torchdistill: pip install -e '.[bench]'")
    result = smoke_run("step_cost.py", tmp_path / "vision.json")
    positive_finite(result, "hkt_over_peer_kd", "hkt_kd_over_peer_kd", "hkt_over_reference", "saved_hkt_over_peer_kd",
                    "export_latency_ratio")
    assert result["params_exported_child"] == result["params_plain_child"] > 0
    assert set(result["step_s"]) == {"child", "torchdistill_kd", "hkt_kd", "hkt", "reference"}
    check = result["kd_loss_check"]
    assert math.isfinite(check["torchdistill"]) and math.isfinite(check["hkt_hf"])
    # The reference step keeps both parent passes' activations for backward: far more than HKT.
    assert result["saved_mib"]["reference"] > 2 * result["saved_mib"]["hkt"]


def test_step_cost_lm_smoke_reports_every_key(tmp_path):
    pytest.importorskip("trl", reason="step_cost_lm.py compares against TRL: pip install -e '.[bench]'")
    result = smoke_run("step_cost_lm.py", tmp_path / "lm.json")
    methods = {"child", "gkd", "chunked", "hint_kd", "hkt_kd", "hkt_lm_head", "hkt_layer", "hkt_layers_kd"}
    assert set(result["step_s"]) | set(result["errors"]) == methods
    keys = ("hkt_lm_over_peer", "hkt_kd_lm_over_peer", "saved_mib_hkt_lm_over_peer", "hkt_layer_lm_over_peer",
            "hkt_layers_kd_lm_over_peer", "hint_kd_over_peer", "hkt_layers_kd_over_hint_kd", "chunked_over_peer",
            "child_over_peer")
    assert set(keys) <= set(result)
    positive_finite(result, *keys)
    assert result["errors"] == {}
    rows = {}  # the first table's rows (the phase breakdown repeats the method names)
    for line in (tmp_path / "lm.md").read_text().splitlines():
        rows.setdefault(line.split(" | ")[0], line)
    ratio = {name: rows[f"| {name}"].split(" | ")[2] for name in ("gkd", "child")}  # the "x GKD" column
    assert ratio["gkd"] == "1" and ratio["child"].split(" ")[0] != "1"  # only the peer is 1x itself, unmeasured
    # GKD keeps full [batch, seq, vocab] tensors for backward; TRL's chunked loss recomputes its tiles instead.
    assert result["saved_vocab_tensors"]["gkd"] >= 1 and result["saved_vocab_tensors"]["chunked"] == 0


@needs_shared
def test_cifar10_quick_writes_resumable_results(tmp_path):
    script = str(BENCHMARKS / "cifar10.py")
    out, cache = tmp_path / "results", tmp_path / "cache"
    run_script(script, "--quick", "--out", str(out), "--cache", str(cache))
    log_text = (out / "cifar10.jsonl").read_text()
    log = harness.RunLog.read(out / "cifar10.jsonl")
    assert set(log.runs) == {"child/seed0", "kd/seed0", "hkt/seed0"}
    commit = harness.provenance()["commit"]
    for key, run in log.runs.items():
        assert key == f"{run['method']}/seed{run['seed']}"
        assert 0.0 <= run["test_accuracy"] <= 100.0 and run["train_s"] > 0 and run["commit"] == commit
        assert (log.resolve(run["folder"]) / "README.md").is_file()  # the card of the package's trainer
    assert run["folder"] == "../cache/runs/results/hkt/seed0" and not harness.absolute_paths(log_text)
    assert log.runs["kd/seed0"]["lineage"]["hkt_loss_weights"] == [1.0, 0.0, 0.0]  # the package's KD
    assert "hkt/classifier:input=classifier:input/gate_mean" in log.runs["hkt/seed0"]["logs"]
    ref = log.reference
    for value in (ref["pretrained-child"], ref["pretrained-parent"], ref["adapted-parent"]["test_accuracy"]):
        assert 0.0 <= value <= 100.0
    assert log.recipe["steps"] > 0 and list(log.commands.values())[0]["wall_s"] > 0
    table = (out / "cifar10.md").read_text()
    assert "| 1 |" in table  # the seed count of each row
    assert (out / "cifar10.png").stat().st_size > 0
    card = (out / "hkt-resnet20-cifar10-jpeg.md").read_text()
    # Rendered by the package from the logged lineage, with the benchmark's baselines added.
    assert "Hereditary Knowledge Transfer lineage" in card and "| Parent | `../cache/parent-resnet56" in card
    assert "## Against the baselines" in card and "same recipe, KD (T = 4)" in card

    again = run_script(script, "--quick", "--out", str(out), "--cache", str(cache))
    assert "skip child/seed0" in again and "skip hkt/seed0" in again
    after = (out / "cifar10.jsonl").read_text()
    assert after.startswith(log_text) and harness.RunLog.read(out / "cifar10.jsonl").runs == log.runs
    assert {json.loads(line)["kind"] for line in after[len(log_text):].splitlines()} == {"command"}


@needs_shared
def test_cifar10_tuned_quick_sweeps_rates_on_validation_and_reports_test(tmp_path):
    script = str(BENCHMARKS / "cifar10_tuned.py")
    out, cache = tmp_path / "results", tmp_path / "cache"
    run_script(script, "--quick", "--out", str(out), "--cache", str(cache), "--lrs", "0.01", "0.03",
               "--methods", "child", "hint+kd")
    log = harness.RunLog.read(out / "cifar10_tuned.jsonl")
    assert set(log.runs) == {f"{m}/lr{lr}/seed0" for m in ("child", "hint+kd") for lr in ("0.01", "0.03")}
    for run in log.runs.values():
        assert 0.0 <= run["validation_accuracy"] <= 100.0 and 0.0 <= run["test_accuracy"] <= 100.0
    assert 0.0 <= log.reference["adapted-parent"]["validation_accuracy"] <= 100.0
    table = (out / "cifar10_tuned.md").read_text()
    assert "| method (validation top-1 %) | lr 0.01 | lr 0.03 |" in table and "`hint+kd`" in table


def test_the_cifar_validation_and_test_halves_are_disjoint_and_not_augmented():
    import cifar10_tuned

    images = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(30) % 10
    validation, test = cifar10_tuned.split_test(images, labels, 2)
    assert len(validation) == len(test) == 15 and not validation.train and not test.train
    assert validation.labels.tolist() == labels[::2].tolist() and test.labels.tolist() == labels[1::2].tolist()
    held = {img.tobytes() for img in validation.images}
    assert not any(img.tobytes() in held for img in test.images)
    assert cifar10_tuned.score({"validation_accuracy": 90.0}) < cifar10_tuned.score({"validation_accuracy": 80.0})


def test_the_hint_baseline_projects_feature_map_channels_with_a_1x1_convolution(tmp_path):
    """FitNets on ResNet stage outputs: one trained 1x1-conv projection per stage pair (channels 8 -> 16), the hint
    an MSE against the frozen parent's map; the batch reaches the models without a cache argument they lack."""
    import baselines
    from transformers import TrainingArguments

    from helpers import image_dataset, tiny_resnet

    child, parent = tiny_resnet(8, seed=1), tiny_resnet(16, seed=2)
    parent_before = {k: v.clone() for k, v in parent.state_dict().items()}
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, optim="sgd")
    stage = "resnet.encoder.stages.0"
    trainer = baselines.BaselineTrainer(child, args, parent_model=parent, train_dataset=image_dataset(8),
                                        pairs=[f"{stage}={stage}"], widths=[(8, 16)], hint="mse", kd_weight=1.0,
                                        clip_projections=True)
    projection = trainer.projections[0]
    x = torch.randn(2, 8, 5, 5)
    conv = torch.nn.functional.conv2d(x, projection.weight[:, :, None, None], projection.bias)
    torch.testing.assert_close(projection(x), conv)
    before = projection.weight.detach().clone()
    with one_torch_thread():
        trainer.train()
    assert not torch.equal(before, projection.weight)
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in parent_before.items())
    # Their gradients are clipped at max_grad_norm, as the Trainer clips the model's: a huge gradient moves a
    # projection by at most lr x max_grad_norm (plain SGD here).
    trainer.args.learning_rate, trainer.args.max_grad_norm = 0.1, 1.0
    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        group.update(lr=0.1, momentum=0.0)
    before = [p.detach().clone() for p in trainer.projections.parameters()]
    optimizer.zero_grad()
    for p in trainer.projections.parameters():
        p.grad = torch.full_like(p, 1000.0)
    optimizer.step()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.projections.parameters(), before)])
    assert 0 < moved.norm().item() <= 0.1 * 1.0 + 1e-6
    with pytest.raises(ValueError, match="widths has 2"):
        baselines.BaselineTrainer(child, args, parent_model=parent, train_dataset=image_dataset(8),
                                  pairs=[f"{stage}={stage}"], widths=[(8, 16), (8, 16)], hint="mse")


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
    """In-process and four of the methods (plain, a hint baseline, two carriers, a trainable gate) at one rate, to
    stay under a minute on a busy 2-core machine; the re-run skips the finished runs."""
    import language_model

    out, cache = tmp_path / "results", tmp_path / "cache"
    methods = ["child", "hint+kd", "hkt-layers", "hkt-learned"]
    with one_torch_thread():
        language_model.main(["--quick", "--out", str(out), "--cache", str(cache), "--methods", *methods])
    log = harness.RunLog.read(out / "language_model.jsonl")
    results = {"runs": log.runs, "recipe": log.recipe, "reference": log.reference}
    assert set(results["runs"]) == {f"{m}/lr0.003/seed0" for m in methods}  # the quick recipe's rate: no sweep
    for run in results["runs"].values():
        assert math.isfinite(run["test_perplexity"]) and run["test_perplexity"] > 1 and run["train_s"] > 0
        assert run["validation_perplexity"] > 1 and (run["lr"], run["steps"]) == (0.003, results["recipe"]["steps"])
        assert run["test_blocks"] == results["reference"]["blocks"]["test"]  # every test block, none dropped
        assert run["step_s"] == pytest.approx(run["train_s"] / run["steps"]) and run["commit"]
        assert len(run["validation_curve"]) == results["recipe"]["steps"] // results["recipe"]["eval_every"]
        assert bool(run["gates"]) == run["method"].startswith("hkt")
    gates = results["runs"]["hkt-learned/lr0.003/seed0"]["gates"]["lm_head:input=lm_head:input"]
    assert 0.0 <= gates["gate_mean"][-1][1] <= 1.0 and gates["mix_weight_mean"][-1][1] >= 0.0
    assert set(results["runs"]["hkt-layers/lr0.003/seed0"]["gates"]) == {"model.layers.2=model.layers.0"}
    assert results["reference"]["parent"]["test_perplexity"] > 1
    assert "| 1 |" in (out / "language_model.md").read_text()
    assert (out / "language_model.png").stat().st_size > 0
    best = cache / "best-child-results"
    assert (best / "config.json").is_file() and (best / "README.md").is_file()
    parent_folder = log.resolve(results["reference"]["parent"]["folder"])
    assert parent_folder == cache.resolve() / f"parent-{language_model.QUICK['sizes'].key()}"
    assert_hub_card(best / "README.md", "llama")
    assert_hub_card(parent_folder / "README.md", "hkt-parent")
    assert not harness.absolute_paths([log.runs, log.reference, log.commands])

    capsys.readouterr()
    with one_torch_thread():
        language_model.main(["--quick", "--out", str(out), "--cache", str(cache), "--methods", "child", "hint+kd"])
    again = capsys.readouterr().out
    assert "skip child/lr0.003/seed0" in again and "skip hint+kd/lr0.003/seed0" in again
    assert harness.RunLog.read(out / "language_model.jsonl").runs == results["runs"]


# ---- the language-model protocol and its baselines (issue 24) ---------------------------------------------------


def tiny_llama(hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=16, tie_word_embeddings=True))


def token_blocks(n: int, seed: int = 0):
    from datasets import Dataset

    ids = torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("torch")


BASELINES = {"hint+kd": dict(hint="mse", kd_weight=1.0), "hint-cos+kd": dict(hint="cosine", kd_weight=1.0),
             "stitch": dict(stitch=True)}


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_each_baseline_trains_its_projection_and_child_with_the_parent_frozen(tmp_path, method):
    import baselines
    from transformers import TrainingArguments, default_data_collator

    parent, child = tiny_llama(32, 4), tiny_llama(16, 2, seed=1)
    parent_before = {k: v.clone() for k, v in parent.state_dict().items()}
    child_before = {k: v.clone() for k, v in child.state_dict().items()}
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = baselines.BaselineTrainer(child, args, parent_model=parent, train_dataset=token_blocks(12),
                                        data_collator=default_data_collator,
                                        pairs=["model.layers.1=model.layers.0", "model.layers.3=model.layers.1"],
                                        **BASELINES[method])
    projections = [p.detach().clone() for p in trainer.projections.parameters()]
    with one_torch_thread():
        trainer.train()
    assert len(projections) == 4  # one Linear (weight, bias) per pair
    assert all(not torch.equal(a, b) for a, b in zip(projections, trainer.projections.parameters()))
    assert any(not torch.equal(v, child.state_dict()[k]) for k, v in child_before.items())
    assert all(torch.equal(v, parent.state_dict()[k]) for k, v in parent_before.items())
    assert all(p.requires_grad for p in parent.parameters()) and parent.training  # given back as it came
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_the_baselines_kd_term_is_the_packages(tmp_path):
    """hint weight 0: the baseline's loss on a batch is the package's KD baseline's (HKTTrainer, weights [1, 0, 0]).
    (Their hint terms differ by design: the baseline's FitNets MSE averages over every position, the package's
    `hkt_hint_weight` over the items, the positions with a target.)"""
    import baselines
    from comparison import kd_settings
    from transformers import TrainingArguments, default_data_collator

    from hkt_hf import HKTTrainer, HKTTrainingArguments

    parent, child = tiny_llama(32, 4), tiny_llama(16, 2, seed=1)
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4)
    batch = default_data_collator([token_blocks(4)[i] for i in range(4)])
    ours = baselines.BaselineTrainer(child, TrainingArguments(**common), parent_model=parent, pairs=[],
                                     kd_weight=0.5, kd_temperature=2.0)
    package = HKTTrainer(child, HKTTrainingArguments(**common, **kd_settings(0.5, 2.0)), parent_model=parent,
                         train_dataset=token_blocks(4))
    child.train()
    with torch.no_grad():
        expected, got = package.compute_loss(child, dict(batch)), ours.compute_loss(child, dict(batch))
    torch.testing.assert_close(got, expected)


def fake_lm_run(calls: list, validation: dict):
    """A stand-in for a training run: records the call, and its validation perplexity is `validation[(method, lr)]`
    (less a little per seed and per step, so every run differs)."""

    def run(method: str, lr: float, seed: int, steps: int) -> dict:
        calls.append((method, lr, seed, steps))
        score = validation[method, lr] - 0.1 * seed - steps / 1000
        return {"method": method, "lr": lr, "seed": seed, "steps": steps, "validation_perplexity": score,
                "test_perplexity": score + 5, "train_s": 1.0}

    return run


def test_each_method_gets_the_rate_of_its_best_validation_then_its_seeds_and_a_rerun_skips_finished_runs(tmp_path):
    import language_model as lm

    validation = {("kd", 1e-3): 50.0, ("kd", 3e-3): 40.0, ("kd", 1e-2): 45.0,  # best in the middle
                  ("hint+kd", 1e-3): 30.0, ("hint+kd", 3e-3): 35.0, ("hint+kd", 1e-2): 90.0}  # best at the edge
    calls: list = []
    log = harness.RunLog.open(tmp_path / "lm.jsonl", {"steps": 10})
    lm.protocol(log, ["kd", "hint+kd"], [1e-3, 3e-3, 1e-2], [0, 1], 10, None, fake_lm_run(calls, validation), lm.score)
    rates = lm.choose_rates(log.runs.values(), 10, lm.score)
    assert rates == {"kd": 3e-3, "hint+kd": 1e-3}
    assert lm.edge_choices(list(log.runs.values()), 10, rates) == ["`hint+kd` (0.001)"]  # the report asks for more
    assert calls[6:] == [("kd", 3e-3, 1, 10), ("hint+kd", 1e-3, 1, 10)]  # seed 0 at the chosen rate: the sweep's
    assert set(log.runs) == {f"{m}/lr{lr:g}/seed0" for m, lr in validation} | {"kd/lr0.003/seed1",
                                                                                 "hint+kd/lr0.001/seed1"}

    calls.clear()  # again, with the longer runs of the best method only
    log = harness.RunLog.open(tmp_path / "lm.jsonl", {"steps": 10})
    lm.protocol(log, ["kd", "hint+kd"], [1e-3, 3e-3, 1e-2], [0, 1], 40, 1, fake_lm_run(calls, validation), lm.score)
    assert calls == [("hint+kd", 1e-3, 0, 40), ("hint+kd", 1e-3, 1, 40)]
    assert {"hint+kd/lr0.001/seed0/steps40", "hint+kd/lr0.001/seed1/steps40"} < set(log.runs)
    ranked = lm.chosen_runs(log.runs.values(), lm.choose_rates(log.runs.values(), 10, lm.score), 10, lm.score)
    assert list(ranked) == ["hint+kd", "kd"] and [len(r) for r in ranked.values()] == [2, 2]
    table = lm.ranked_table(ranked)
    assert "| 1 | " in table[2] and "`hint+kd`" in table[2] and "| 0.001 | 2 | 29.94 +- 0.07 |" in table[2]
    paired = lm.paired_lines(ranked)[1]  # hint+kd 30 - 0.1 seed vs kd 40 - 0.1 seed: 10 lower on both seeds
    assert paired.startswith("Paired by seed (0, 1): `hint+kd` below `kd` by 10.00, 10.00 validation")
    assert paired.endswith("(on every shared seed).")
    assert "not on every seed" in lm.paired_lines(dict(reversed(ranked.items())))[1]


def test_test_perplexity_counts_every_block_even_a_partial_last_batch():
    import language_model as lm

    model, blocks = tiny_llama(16, 1), token_blocks(5)
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b["input_ids"][None], labels=b["labels"][None]).loss.item() for b in blocks]
    perplexity, count = lm.block_perplexity(model, blocks, batch_size=2)  # batches of 2, 2 and 1
    assert count == 5
    assert perplexity == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert perplexity != pytest.approx(math.exp(sum(losses[:4]) / 4), rel=1e-5)  # what a drop-last loader gives


def test_a_child_from_the_parents_layers_holds_every_kth_layer_and_the_embeddings():
    import language_model as lm

    parent = tiny_llama(16, 6)
    child = lm.new_child(parent, seed=3, init="parent-layers")
    assert child.config.num_hidden_layers == 2 and child.config.hidden_size == parent.config.hidden_size
    for j, source in ((0, 0), (1, 3)):
        for name, tensor in child.model.layers[j].state_dict().items():
            assert torch.equal(tensor, parent.model.layers[source].state_dict()[name]), (j, name)
    assert torch.equal(child.model.embed_tokens.weight, parent.model.embed_tokens.weight)
    assert torch.equal(child.model.norm.weight, parent.model.norm.weight)
    same_width = lm.new_child(parent, seed=3, init="same-width")
    assert same_width.config.to_dict() == child.config.to_dict()
    assert not torch.equal(same_width.model.layers[0].mlp.up_proj.weight, child.model.layers[0].mlp.up_proj.weight)
    assert lm.new_child(parent, seed=3, init="random").config.hidden_size == parent.config.hidden_size // 2


@pytest.mark.parametrize("bad", [["--lrs", "0", "1e-3"], ["--lrs", "1e-3", "1e-3"], ["--top", "0"], ["--steps", "0"]])
def test_the_protocol_refuses_bad_options_before_anything_runs(tmp_path, bad, capsys):
    import language_model

    with pytest.raises(SystemExit):
        language_model.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c"), *bad])
    assert bad[0] in capsys.readouterr().err and not (tmp_path / "out").exists()
