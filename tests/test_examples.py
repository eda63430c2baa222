"""The examples run end to end in their --quick mode (offline, small data) and report what they trained."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import EXAMPLES
from hkt_hf.lineage import read_lineage


def run_example(name: str, *args) -> None:
    # One thread: tiny models gain nothing from more, and a busy CI machine makes several threads much slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_train_cifar10_quick(tmp_path, checkpoint_path, tiny_cifar_dir):
    out = tmp_path / "hkt-resnet20"
    run_example("train_cifar10.py", "--parent", checkpoint_path("resnet56"), "--child", checkpoint_path("resnet20"),
                "--dataset", tiny_cifar_dir, "--quick", "--max_steps", 2, "--per_device_train_batch_size", 16,
                "--output_dir", out, "--use_cpu")
    results = json.loads((out / "eval_results.json").read_text())
    assert 40.0 < results["parent_top1"] <= 100.0 and 40.0 < results["child_top1_before"] <= 100.0
    lineage = read_lineage(out / "hkt_config.json")
    assert lineage["hkt_parent"].endswith("resnet56-4bfd9763.th")
    assert lineage["hkt_carriers"] == ["classifier:input=classifier:input"]
    args = json.loads((out / "hkt_config.json").read_text())
    assert args["hkt_gate"] == "genetic" and args["hkt_lambda"] == 0.6


def test_image_classification_quick(tmp_path, tiny_cifar_dir):
    out = tmp_path / "vit"
    run_example("image_classification.py", "--quick", "--dataset_name", tiny_cifar_dir, "--output_dir", out)
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["epoch"] > 0
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 16  # the child, not the parent
    assert {"hkt_config.json", "preprocessor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}


def test_text_classification_quick_learns_the_task(tmp_path):
    out = tmp_path / "bert"
    run_example("text_classification.py", "--quick", "--output_dir", out)
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9  # separable synthetic sentiment: a working run learns it
    assert (out / "tokenizer.json").is_file()
    assert read_lineage(out / "hkt_config.json")["child_architecture"] == "BertForSequenceClassification"
