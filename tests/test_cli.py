"""The `hkt-hf` command line, run in-process through `main([...])`."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from datasets import DatasetDict
from transformers import AutoModelForImageClassification

from hkt_hf.apps import cli
from hkt_hf.apps.cli import evaluate as evaluate_command
from hkt_hf.apps.data.images import load_image_dataset, prepare_image_dataset, strided_subset
from hkt_hf.apps.metrics import top1_accuracy
from hkt_hf.apps.models import cifar_image_processor


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_registry_has_one_parser_per_subcommand():
    assert {"import-checkpoint", "evaluate", "train", "push", "demo"} <= set(cli.COMMANDS)
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "--model", "m", "--dataset", "d"])
    assert args.command == "evaluate"
    (options,) = cli.options_from(args, cli.COMMANDS["evaluate"].options)
    assert isinstance(options, evaluate_command.EvaluateOptions)
    assert (options.split, options.batch_size, options.limit, options.device, options.json) == ("test", 256, None,
                                                                                               "cpu", False)


def test_positionals_and_dashed_flags_fill_the_options():
    args = cli.build_parser().parse_args(["import-checkpoint", "a.th", "out", "--allow-pickle"])
    (options,) = cli.options_from(args, cli.COMMANDS["import-checkpoint"].options)
    assert (options.src, options.out_dir, options.allow_pickle) == ("a.th", "out", True)


@pytest.mark.parametrize("name", ["import-checkpoint", "evaluate"])
def test_subcommand_help_teaches_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: hkt-hf {name}" in out
    assert "examples:" in out and f"hkt-hf {name} " in out.split("examples:")[1]


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "import-checkpoint" in out and "evaluate" in out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_import_checkpoint(capsys, checkpoint_path, tmp_path):
    out_dir = tmp_path / "resnet20"
    code, out, err = run(capsys, "import-checkpoint", checkpoint_path("resnet20"), out_dir)
    assert code == 0, err
    assert "depth 20" in out and "269,722 parameters" in out
    assert str(out_dir.resolve()) in out
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= {p.name for p in out_dir.iterdir()}
    assert AutoModelForImageClassification.from_pretrained(out_dir).config.depth == 20


def test_import_checkpoint_bad_file_exits_2(capsys, tmp_path):
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"definitely not a checkpoint")
    code, out, err = run(capsys, "import-checkpoint", junk, tmp_path / "out")
    assert code == 2 and out == ""
    assert "hkt-hf import-checkpoint: error: Could not read checkpoint" in err
    assert "Traceback" not in err

    code, _, err = run(capsys, "import-checkpoint", tmp_path / "missing.th", tmp_path / "out")
    assert code == 2 and "No checkpoint file" in err and "SRC" in err


def test_evaluate_json_on_a_strided_subset(capsys, resnet20_dir, cifar_test_parquet, cifar_test_split):
    code, out, err = run(
        capsys, "evaluate", "--model", resnet20_dir, "--dataset", cifar_test_parquet, "--limit", 200, "--json",
        "--batch-size", 100,
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["num_images"] == 200 and result["split"] == "test"
    assert result["model"] == str(resnet20_dir)

    # The same number, computed through the library on the same strided rows.
    model = AutoModelForImageClassification.from_pretrained(resnet20_dir)
    subset = strided_subset(cifar_test_split, 200)
    prepared = prepare_image_dataset(DatasetDict({"test": subset}), cifar_image_processor(), train_split=None)
    assert result["top1_accuracy"] == pytest.approx(top1_accuracy(model, prepared["test"], progress=False))
    assert 65.0 < result["top1_accuracy"] < 95.0


def test_evaluate_prints_a_sentence_with_progress_bar(capsys, resnet20_dir, tiny_cifar_dir):
    code, out, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tiny_cifar_dir, "--batch-size", 32)
    assert code == 0, err
    assert re.fullmatch(r"top-1 accuracy: \d{1,3}\.\d\d % on 64 images\n", out)
    assert "evaluate" in err and "2/2" in err  # tqdm progress bar on stderr: 64 images / batch 32


def test_evaluate_train_split_is_not_augmented(capsys, resnet20_dir, tiny_cifar_dir):
    results = []
    for _ in range(2):
        code, out, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tiny_cifar_dir,
                             "--split", "train", "--json", "--no-progress")
        assert code == 0, err
        results.append(json.loads(out)["top1_accuracy"])
    model = AutoModelForImageClassification.from_pretrained(resnet20_dir)
    plain = prepare_image_dataset(load_image_dataset(str(tiny_cifar_dir)), cifar_image_processor(), train_split=None)
    assert results[0] == results[1] == pytest.approx(top1_accuracy(model, plain["train"], progress=False))


def test_evaluate_missing_split_lists_available_splits(capsys, resnet20_dir, tiny_cifar_dir):
    code, out, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tiny_cifar_dir,
                         "--split", "validation")
    assert code == 2 and out == ""
    assert "no split 'validation'" in err
    assert "available splits: test, train" in err and "--split" in err


def test_evaluate_missing_model_path(capsys, tmp_path, tiny_cifar_dir):
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "no-such-model", "--dataset", tiny_cifar_dir)
    assert code == 2 and out == ""
    assert "No model folder at" in err and "import-checkpoint" in err


def test_evaluate_folder_without_config(capsys, tmp_path, tiny_cifar_dir):
    code, _, err = run(capsys, "evaluate", "--model", tmp_path, "--dataset", tiny_cifar_dir)
    assert code == 2 and "has no config.json" in err


def test_evaluate_missing_dataset_path(capsys, resnet20_dir, tmp_path):
    code, _, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tmp_path / "nope" / "test.parquet")
    assert code == 2 and "No dataset at" in err
    code, _, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tmp_path)
    assert code == 2 and "no *.parquet files" in err


def test_evaluate_without_processor_warns_and_uses_cifar_default(capsys, resnet20_dir, tiny_cifar_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(resnet20_dir / name, bare / name)
    code, out, err = run(capsys, "evaluate", "--model", bare, "--dataset", tiny_cifar_dir, "--json", "--no-progress")
    assert code == 0, err
    assert "warning" in err and "preprocessor_config.json" in err
    code, with_processor, _ = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tiny_cifar_dir, "--json",
                                  "--no-progress")
    assert json.loads(out)["top1_accuracy"] == json.loads(with_processor)["top1_accuracy"]


@pytest.mark.parametrize("bad", ["0", "-5", "ten"])
def test_evaluate_limit_must_be_positive(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--model", "m", "--dataset", "d", "--limit", bad])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_evaluate_unavailable_device(capsys, resnet20_dir, tiny_cifar_dir):
    code, _, err = run(capsys, "evaluate", "--model", resnet20_dir, "--dataset", tiny_cifar_dir, "--device", "gpu0")
    assert code == 2 and "--device" in err
