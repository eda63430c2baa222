"""`hkt-hf demo`: the digits story end to end (shortened), its honest table, and the --dataset path."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from hkt_hf.apps import cli
from hkt_hf.apps.demo import RUNS, DemoRecipe, DemoReport, RunResult, digits_task, format_table


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_digits_task_is_the_bundled_data_with_a_fixed_split():
    a, b = digits_task(), digits_task()
    assert (len(a.train), len(a.test)) == (1347, 450)
    assert a.train[0]["pixel_values"].shape == (1, 8, 8)
    assert a.test[:]["labels"].tolist() == b.test[:]["labels"].tolist()
    assert sorted(set(a.test[:]["labels"].tolist())) == list(range(10))
    parent, child = a.make_parent(0), a.make_child(0)
    assert sum(p.numel() for p in parent.parameters()) > 20 * sum(p.numel() for p in child.parameters())


def test_demo_on_digits_prints_the_table_and_writes_the_plot(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--seeds", 0, "--epochs", 2, "--output-dir", tmp_path, "--no-progress")
    assert code == 0, err
    table = (tmp_path / "demo.txt").read_text()
    assert table.strip() in out
    assert "1 seed" in table and "digits" in table
    rows = {m.group(1).strip(): m for m in re.finditer(r"^(parent|child alone|KD|HKT)\s+\| ([\d.]+)\s+\| +([\d,]+) \|"
                                                       r" +(\S+) \| +(\S+)$", table, re.M)}
    assert set(rows) == set(RUNS)
    assert rows["child alone"].group(3) == rows["KD"].group(3) == rows["HKT"].group(3) == "4,934"
    assert rows["parent"].group(3) == "172,218"
    gate, mix = float(rows["HKT"].group(4)), float(rows["HKT"].group(5))
    assert 0.0 < gate < 1.0 and 0.0 < mix <= 0.6  # mixing weight lambda * (1 - a) with lambda = 0.6
    assert rows["KD"].group(4) == "-"
    # The per-run lines and the table agree.
    for name in RUNS:
        assert re.search(rf"{re.escape(name)}\s+seed 0: test top-1 +{rows[name].group(2)} %", out)
    with Image.open(tmp_path / "demo.png") as png:
        assert png.size[0] > 800 and png.size[1] > 300


def report(accuracies: dict[str, list[float]]) -> DemoReport:
    runs = [RunResult(name, seed, acc, 10, 1.0, [(1, 1.0)], 0.5 if name == "HKT" else None,
                      0.3 if name == "HKT" else None)
            for name, values in accuracies.items() for seed, acc in enumerate(values)]
    return DemoReport("toy", DemoRecipe(), list(range(len(accuracies["HKT"]))), runs, 1.0)


def test_table_says_when_hkt_does_not_beat_the_child_alone():
    table = format_table(report({"parent": [99.0], "child alone": [95.0, 97.0], "KD": [96.0, 96.0],
                                 "HKT": [94.0, 95.0]}))
    assert "HKT does NOT beat the child alone by -1.50 points (KD: +0.00)" in table
    assert "96.00 ± 1.41" in table and "2 seeds (mean ± std)" in table
    table = format_table(report({"parent": [99.0], "child alone": [90.0], "KD": [91.0], "HKT": [92.5]}))
    assert "HKT beats the child alone by +2.50 points (KD: +1.00)" in table and "1 seed" in table


def test_demo_on_a_parquet_dataset_with_a_given_parent(capsys, tmp_path, tiny_cifar_dir, checkpoint_path):
    code, out, err = run(capsys, "demo", "--dataset", tiny_cifar_dir, "--parent", checkpoint_path("resnet20"),
                         "--seeds", 3, "--epochs", 1, "--output-dir", tmp_path, "--no-progress", "--threads", 2)
    assert code == 0, err
    assert "parent       seed 3" in out and "(given, not trained)" in out
    assert re.search(r"^parent\s+\| [\d.]+\s+\| +269,722 \|", out, re.M)  # the reference ResNet-20, used as is
    assert "64 train / 64 test" in out and (tmp_path / "demo.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--parent", "p"], "need --dataset"), (["--dataset", "./no/data"], "No dataset at ./no/data")],
)
def test_demo_wrong_input_exits_2(capsys, argv, message):
    code, out, err = run(capsys, "demo", *argv)
    assert code == 2 and message in err and "Traceback" not in err
