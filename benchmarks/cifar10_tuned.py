"""CIFAR-10 (JPEG) with every method at its own learning rate: `cifar10.py`'s recipe, methods and parent, with the
test split halved: every 2nd test image is the validation split that chooses each method's rate
(`rate_protocol.py`), the other half the test split that reports.

Why not hold out training images: the pretrained ResNet-20 and ResNet-56 were trained on CIFAR-10's training images,
so held-out training images are not unseen (a check scored 92.6 % on them against 85.7 % on test), and they would
favour the rates that keep what pretraining memorised. Neither model has seen a test image.

1. Rate sweep: every method at every rate of `--lrs` on seed 0 (the recipe's steps); the final validation accuracy
   chooses each method's rate (highest wins). Test accuracy is measured too and chooses nothing.
2. Seeds: every method (or, with `--top K`, the K best on validation) at its chosen rate on each of `--seeds`.
3. Report: methods ranked on mean validation accuracy, test accuracy beside it, the sweep, the step time.

The parent is `cifar10.py`'s (the pretrained ResNet-56 adapted to the training split, 150 steps, seed 0). Runs are
logged at once to `<out>/cifar10_tuned.jsonl` and skipped when the
command runs again:

    python benchmarks/cifar10_tuned.py --out benchmarks/results/cifar10-tuned --lrs 0.003 0.01 0.03 --seeds 0 1 2
    python benchmarks/cifar10_tuned.py --out benchmarks/results/cifar10-tuned --report
    python benchmarks/cifar10_tuned.py --quick --out DIR --lrs 0.01 0.03          # smoke run on subsets
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cifar10 import DESCRIPTIONS, FULL, METHODS, QUICK, adapted_parent, evaluate, recipe, run_one
from common import LR, CifarTensors, decoded_split
from harness import CACHE, RESULTS, RunLog, benchmark_parser, commands_line, mean_text, notes_lines, run_or_report
from harness import write_report
from rate_protocol import add_rate_options, check_rate_options, choose_rates, chosen_runs, edge_choices, protocol
from rate_protocol import run_key, sweep_runs, sweep_table

LOG_NAME = "cifar10_tuned.jsonl"
VALIDATION_EVERY = 2  # every 2nd test image (5,000 of 10,000) is validation, the rest test
DEFAULT_METHODS = ["child", "kd", "hint+kd", "hkt-blocks+kd", "hkt+kd-lambda0.3"]


def score(run: dict[str, Any]) -> float:
    """What chooses rates and ranks methods (lower is better): minus the final validation accuracy."""
    return -run["validation_accuracy"]


def split_test(images: np.ndarray, labels: np.ndarray, every: int) -> tuple[CifarTensors, CifarTensors]:
    """(every `every`-th row: validation; the other rows: test), neither augmented."""
    held = np.arange(len(images)) % every == 0
    return (CifarTensors(images[held], labels[held], train=False),
            CifarTensors(images[~held], labels[~held], train=False))


def run_all(opts: argparse.Namespace, argv: list[str]) -> Path:
    settings = dict(QUICK if opts.quick else FULL, validation_every=VALIDATION_EVERY)
    rec = recipe(settings, bf16=False)
    out: Path = opts.out or (opts.cache / "quick-results-tuned" if opts.quick else RESULTS / "cifar10-tuned")
    log = RunLog.open(out / LOG_NAME, rec)
    finish = log.start_command("benchmarks/cifar10_tuned.py", argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    train = CifarTensors(*decoded_split("train", rec["train_rows"], opts.cache), train=True)
    validation, test = split_test(*decoded_split("test", rec["test_rows"], opts.cache), VALIDATION_EVERY)
    parent, parent_info = adapted_parent(rec, (train, test), opts.cache)
    log.set_reference("adapted-parent", {**parent_info, "validation_accuracy": evaluate(parent, validation)})

    def run(method: str, lr: float, seed: int, steps: int) -> dict[str, Any]:
        folder = opts.cache / "runs" / out.name / run_key(method, lr, seed, steps, rec["steps"])
        record = run_one(method, seed, rec, (train, test), parent, folder, lr, validation)
        if "lineage" in record:  # the parent was loaded from its cached folder: an absolute path
            record["lineage"]["hkt_parent"] = log.relative(record["lineage"]["hkt_parent"])
        return {**record, "lr": lr, "steps": steps, "folder": log.relative(folder)}

    protocol(log, opts.methods, opts.lrs or [LR], opts.seeds, rec["steps"], opts.top, run, score)
    finish()
    report(out)
    return log.path


def ranked_table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| rank | method | rate | n | validation top-1 % | test top-1 % | test per seed | train s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, (method, runs) in enumerate(rows.items(), 1):
        per_seed = ", ".join(f"{r['test_accuracy']:.2f}" for r in sorted(runs, key=lambda r: r["seed"]))
        lines.append(f"| {rank} | {DESCRIPTIONS[method]} (`{method}`) | {runs[0]['lr']:g} | {len(runs)} | "
                     f"{mean_text([r['validation_accuracy'] for r in runs])} | "
                     f"{mean_text([r['test_accuracy'] for r in runs])} | {per_seed} | "
                     f"{statistics.fmean(r['train_s'] for r in runs):.0f} |")
    return lines


def markdown_table(log: RunLog) -> str:
    rec, runs = log.recipe, list(log.runs.values())
    rates = choose_rates(runs, rec["steps"], score)
    lines = ["Ranked on validation accuracy (each method at its chosen rate; mean +- std over seeds); test accuracy "
             "reported, never used to choose.", "", *ranked_table(chosen_runs(runs, rates, rec["steps"], score)),
             "", "Rate sweep (seed 0, validation top-1 %; bold: chosen):", "",
             *sweep_table(runs, rec["steps"], rates, "validation_accuracy", "validation top-1 %")]
    edge = edge_choices(runs, rec["steps"], rates)
    if edge:
        lines += ["", f"Chosen at the edge of the sweep (extend it with one more rate beyond): {', '.join(edge)}."]
    parent = log.reference.get("adapted-parent")
    if parent:
        lines += ["", f"Parent: ResNet-56 adapted to the training split ({parent['steps']} steps): validation "
                      f"{parent['validation_accuracy']:.2f} %, test {parent['test_accuracy']:.2f} %."]
    lines += ["", f"Recipe: `cifar10.py`'s ({rec['steps']} SGD steps, batch {rec['batch_size']}, momentum "
                  f"{rec['momentum']}, weight decay {rec['weight_decay']}, {rec['schedule']}, {rec['augmentation']}, "
                  f"fp32, the pretrained ResNet-20 as the child's start, {rec['train_rows'] or 'all 50,000'} training "
                  f"images) at each method's rate; final accuracy in fp32, once, after the last step, on one test "
                  f"image in {rec['validation_every']} (validation: chooses the rate) and on the others (test: "
                  f"reported), of {rec['test_rows'] or '10,000'}.", "", commands_line(log.commands.values()),
              *notes_lines(log.runs)]
    return "\n".join(lines)


def plot(log: RunLog, path: Path) -> None:
    """Validation accuracy against rate (seed 0), one line per method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sweep = sweep_runs(log.runs.values(), log.recipe["steps"])
    for method in dict.fromkeys(r["method"] for r in sweep):
        points = sorted((r["lr"], r["validation_accuracy"]) for r in sweep if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method, linestyle="-" if method.startswith("hkt") else "--")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD)")
    ax.set_ylabel("validation top-1 % (seed 0)")
    ax.set_title("ResNet-20 child, ResNet-56 parent: the rate sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path) -> None:
    log = RunLog.read(out / LOG_NAME)
    table = markdown_table(log)
    write_report(out, "cifar10_tuned", "CIFAR-10 (JPEG): final accuracy at each method's rate", table,
                 lambda path: plot(log, path))
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], METHODS, DEFAULT_METHODS, CACHE,
                              "a few steps on subsets: a CI smoke run")
    add_rate_options(parser, LR)
    opts = parser.parse_args(argv)
    check_rate_options(parser, opts)
    if opts.steps is not None:
        parser.error("--steps is the recipe's here (cifar10.py's); use cifar10.py for other budgets")
    return run_or_report(opts, argv, run_all, report)


if __name__ == "__main__":
    raise SystemExit(main())
