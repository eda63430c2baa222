"""The per-method learning-rate protocol of the accuracy benchmarks (`language_model.py`, `cifar10.py`).

Every method is swept over the same rates on seed 0 at the recipe's steps; each method's rate is the one with the
best final validation score; then the seeds run at that rate (all methods, or the `top` best on validation). Runs
are keyed `method/lr<rate>/seed<k>[/steps<n>]` and logged at once, so a re-run skips the finished ones. A `score`
maps a run to a number where lower is better (validation perplexity, or minus validation accuracy); nothing here
reads a test metric.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from harness import RunLog

Score = Callable[[dict[str, Any]], float]


def run_key(method: str, lr: float, seed: int, steps: int, base_steps: int) -> str:
    return f"{method}/lr{lr:g}/seed{seed}" + ("" if steps == base_steps else f"/steps{steps}")


def ensure(log: RunLog, key: str, run: Callable[[], dict[str, Any]]) -> None:
    """Run and log `key` unless the log holds it already."""
    if log.finished(key):
        print(f"skip {key}: already in {log.path}", flush=True)
        return
    print(f"run {key}", flush=True)
    log.add_run(key, **run())
    print(f"done {key}", flush=True)


def sweep_runs(runs: Iterable[dict[str, Any]], base_steps: int) -> list[dict[str, Any]]:
    """The seed-0 runs at the recipe's steps: the ones that choose the rates."""
    return [r for r in runs if r["seed"] == 0 and r["steps"] == base_steps]


def choose_rates(runs: Iterable[dict[str, Any]], base_steps: int, score: Score) -> dict[str, float]:
    """Per method, the rate of its best-scoring seed-0 sweep run (`base_steps`)."""
    best: dict[str, dict[str, Any]] = {}
    for run in sweep_runs(runs, base_steps):
        if run["method"] not in best or score(run) < score(best[run["method"]]):
            best[run["method"]] = run
    return {method: run["lr"] for method, run in best.items()}


def chosen_runs(runs: Iterable[dict[str, Any]], rates: dict[str, float], steps: int,
                score: Score) -> dict[str, list[dict]]:
    """Per method, its runs at its chosen rate and `steps`, ranked on their mean score (best first)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["steps"] == steps and rates.get(run["method"]) == run["lr"]:
            rows.setdefault(run["method"], []).append(run)
    return dict(sorted(rows.items(), key=lambda kv: statistics.fmean(score(r) for r in kv[1])))


def protocol(log: RunLog, methods: list[str], lrs: list[float], seeds: list[int], steps: int, top: int | None,
             run: Callable[[str, float, int, int], dict[str, Any]], score: Score) -> None:
    """The sweep on seed 0 at the recipe's steps, then `seeds` of every method (or of the `top` best on validation)
    at its chosen rate for `steps` steps; finished runs are skipped."""
    base = log.recipe["steps"]
    for method in methods:
        for lr in lrs:
            ensure(log, run_key(method, lr, 0, base, base), lambda: run(method, lr, 0, base))
    rates = choose_rates(log.runs.values(), base, score)
    ranked = [m for m in chosen_runs(log.runs.values(), rates, base, score) if m in methods]
    for seed in seeds:
        for method in ranked[:top] if top else methods:
            lr = rates[method]
            ensure(log, run_key(method, lr, seed, steps, base), lambda: run(method, lr, seed, steps))


def sweep_table(runs: list[dict[str, Any]], base_steps: int, rates: dict[str, float], metric: str,
                label: str) -> list[str]:
    """`metric` of every seed-0 sweep run, method by rate (the chosen rate in bold)."""
    sweep = sweep_runs(runs, base_steps)
    lrs = sorted({r["lr"] for r in sweep})
    lines = [f"| method ({label}) | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for method in dict.fromkeys(r["method"] for r in sweep):
        cells = {r["lr"]: r[metric] for r in sweep if r["method"] == method}
        lines.append(f"| `{method}` | " + " | ".join(
            "-" if lr not in cells else f"**{cells[lr]:.2f}**" if lr == rates[method] else f"{cells[lr]:.2f}"
            for lr in lrs) + " |")
    return lines


def edge_choices(runs: list[dict[str, Any]], base_steps: int, rates: dict[str, float]) -> list[str]:
    """The methods whose chosen rate is the lowest or highest of the (more than two) rates they were swept at."""
    swept: dict[str, set[float]] = {}
    for run in sweep_runs(runs, base_steps):
        swept.setdefault(run["method"], set()).add(run["lr"])
    return [f"`{m}` ({rates[m]:g})" for m, lrs in swept.items() if len(lrs) > 2 and rates[m] in (min(lrs), max(lrs))]


def add_rate_options(parser: argparse.ArgumentParser, default_rate: float) -> None:
    """`--lrs` (the seed-0 sweep) and `--top` (seeds of the K best only), as both benchmarks take them."""
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help=f"rates of the seed-0 sweep (default: the recipe's {default_rate:g} only, no sweep)")
    parser.add_argument("--top", type=int, default=None, help="run the seeds of the K best methods on validation only")


def check_rate_options(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Refuse a `--top` below 1 and rates that are not distinct and positive, through `parser.error`."""
    if opts.top is not None and opts.top < 1:
        parser.error("--top must be at least 1")
    if opts.lrs and (min(opts.lrs) <= 0 or len(set(opts.lrs)) != len(opts.lrs)):
        parser.error(f"--lrs must be distinct positive rates, got {opts.lrs}")
