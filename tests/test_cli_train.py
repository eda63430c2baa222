"""`hkt-hf train` and `hkt-hf push`: a real (short) HKT run on CIFAR images, config files, and clear usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import DatasetDict
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hkt_hf import HKTTrainingArguments
from hkt_hf.apps import cli
from hkt_hf.apps.cli import train as train_command
from hkt_hf.lineage import read_lineage
from hkt_hf.apps.data.images import load_image_dataset, prepare_image_dataset, strided_subset
from hkt_hf.apps.metrics import top1_accuracy
from hub_server import FakeHub
from test_hub import hub_env


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parsed(*argv) -> SimpleNamespace:
    """The options `hkt-hf train` works on (its own and the training arguments in one namespace), config file
    merged, without training."""
    argv = [str(a) for a in argv]
    data, training_args = train_command.parse(cli.build_parser().parse_args(["train", *argv]), argv)
    assert isinstance(training_args, HKTTrainingArguments)
    return SimpleNamespace(**vars(training_args), **vars(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint_path, resnet20_dir, tiny_cifar_dir):
    """One `hkt-hf train` run: ResNet-20 child from the reference .th file, the imported ResNet-20 as parent."""
    out_dir = tmp_path_factory.mktemp("train") / "child"
    argv = ["train", "--child", checkpoint_path("resnet20"), "--parent", resnet20_dir, "--dataset", tiny_cifar_dir,
            "--max_steps", 2, "--per_device_train_batch_size", 16, "--max_eval_samples", 32, "--output_dir", out_dir,
            "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--learning_rate", 0.01, "--hkt_lambda", 0.5]
    code = cli.main([str(a) for a in argv])
    return code, out_dir


def test_train_saves_an_evaluated_plain_child(trained, capsys, resnet20_dir, tiny_cifar_dir):
    code, out_dir = trained
    assert code == 0
    names = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "hkt_config.json",
            "eval_results.json"} <= names
    lineage = read_lineage(out_dir / "hkt_config.json")
    assert lineage["hkt_parent"] == str(resnet20_dir) and lineage["hkt_lambda"] == 0.5
    assert lineage["child_architecture"] == "CifarResNetForImageClassification"
    # The reported top-1 is that of the saved child on the same 32 strided test rows.
    results = json.loads((out_dir / "eval_results.json").read_text())
    child = AutoModelForImageClassification.from_pretrained(out_dir)
    test = strided_subset(load_image_dataset(str(tiny_cifar_dir))["test"], 32)
    prepared = prepare_image_dataset(DatasetDict({"test": test}), AutoImageProcessor.from_pretrained(out_dir),
                                     train_split=None)["test"]
    assert results["top1_accuracy"] == pytest.approx(top1_accuracy(child, prepared, progress=False))
    parent = AutoModelForImageClassification.from_pretrained(resnet20_dir)
    assert results["parent_top1_accuracy"] == pytest.approx(top1_accuracy(parent, prepared, progress=False))
    # Two SGD steps changed the child away from the reference weights it started from.
    assert not torch.equal(child.classifier.weight, parent.classifier.weight)


def test_push_sends_the_child_and_its_metrics_to_the_hub(trained, tmp_path):
    _, out_dir = trained
    with FakeHub() as hub:
        env = hub_env(tmp_path / "hf-home", HF_ENDPOINT=hub.endpoint)
        proc = subprocess.run([sys.executable, "-m", "hkt_hf.apps.cli", "push", str(out_dir), "cli-child",
                               "--token", "hf_test", "--dataset", "uoft-cs/cifar10"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pushed" in proc.stdout
    files = hub.repos["user/cli-child"]
    assert {"config.json", "model.safetensors", "hkt_config.json", "preprocessor_config.json", "README.md"} <= set(files)
    assert "eval_results.json" not in files and "training_args.bin" not in files
    card = files["README.md"].decode()
    results = json.loads((out_dir / "eval_results.json").read_text())
    assert f"{results['top1_accuracy']:.4f}" in card and f"{results['parent_top1_accuracy']:.4f}" in card


def test_push_errors_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "push", tmp_path / "missing", "user/x")
    assert code == 2 and "No folder at" in err and "--output_dir" in err
    code, _, err = run(capsys, "push", tmp_path, "user/x")
    assert code == 2 and "has no config.json" in err and "Traceback" not in err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_are_defaults_that_flags_override(tmp_path, suffix):
    values = {"child": "c", "parent": "p", "dataset": "d", "learning_rate": 0.05, "hkt_loss_weights": [1, 0, 2],
              "max_steps": 7}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    for argv in ([path, "--learning_rate", 0.2], ["--config", path, "--learning_rate", 0.2]):
        ns = parsed(*argv)
        assert (ns.child, ns.parent, ns.dataset, ns.max_steps) == ("c", "p", "d", 7)
        assert ns.hkt_loss_weights == [1, 0, 2]
        assert ns.learning_rate == pytest.approx(0.2)
        assert ns.remove_unused_columns is False  # the CLI's own default survives a config file


def test_flags_alone_cover_every_training_argument():
    ns = parsed("--hkt_gate", "learned", "--hkt_carriers", "a=b", "c=d", "--optim", "sgd", "--no_augment")
    assert ns.hkt_gate == "learned" and ns.hkt_carriers == ["a=b", "c=d"] and ns.optim == "sgd"
    assert ns.augment is False and ns.output_dir == "hkt-child"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--child", "c", "--parent", "p"], "Missing --dataset"),
        (["--child", "c", "--dataset", "d"], "Missing --parent"),
        (["--child", "c", "--parent", "p", "--dataset", "d", "--hkt_lambda", 2], "hkt_lambda must lie in [0, 1]"),
        (["--child", "c", "--parent", "p", "--dataset", "d", "--remove_unused_columns", "True"], "drops the image"),
        (["--child", "c", "--parent", "p", "--hkt_parent", "q", "--dataset", "d"], "disagree"),
        (["--child", "./no/such/child", "--parent", "p", "--dataset", "d"], "No model folder at ./no/such/child"),
    ],
)
def test_wrong_input_exits_2_with_the_fix(capsys, argv, message):
    code, out, err = run(capsys, "train", *argv)
    assert code == 2 and out == "", err
    assert message in err and "Traceback" not in err


def test_unknown_config_key_suggests_the_right_one(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("child: c\nlearning_rat: 0.1\n")
    code, _, err = run(capsys, "train", path)
    assert code == 2 and "learning_rat (did you mean learning_rate?)" in err
    code, _, err = run(capsys, "train", tmp_path / "missing.yaml")
    assert code == 2 and "No config file at" in err
    path.write_text("- a list\n")
    code, _, err = run(capsys, "train", path)
    assert code == 2 and "mapping" in err


def test_child_with_too_few_labels_is_refused(capsys, tmp_path, resnet20_dir, tiny_cifar_dir):
    small = AutoModelForImageClassification.from_pretrained(resnet20_dir, num_labels=3, ignore_mismatched_sizes=True)
    small.save_pretrained(tmp_path / "three")
    code, _, err = run(capsys, "train", "--child", tmp_path / "three", "--parent", resnet20_dir,
                       "--dataset", tiny_cifar_dir, "--output_dir", tmp_path / "out", "--use_cpu")
    assert code == 2 and "The child predicts 3 classes but the dataset has 10" in err


@pytest.mark.parametrize("name", ["push", "demo"])
def test_push_and_demo_help_show_examples(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"hkt-hf {name}" in out.split("examples:")[1]


def test_train_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--child", "--parent", "--dataset", "--learning_rate", "--hkt_gate", "--hkt_loss_weights", "CONFIG"):
        assert flag in out
    assert "hkt-hf train run.yaml" in out.split("examples:")[1]
