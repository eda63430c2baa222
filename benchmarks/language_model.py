"""Test perplexity of a small Llama-style child language model trained alone, with KD and with HKT variants, on the
python-stdlib corpus (CPython's standard library source; `../shared/data/python-stdlib`).

The task (tokenizer, blocks, models) is `benchmarks/lm_task.py`, which `examples/language_modeling.py` uses too:

1. A byte-level BPE tokenizer trained on the train split, and a Llama parent trained from scratch on it with the
   plain `Trainer` (seed 0); both cached as `save_pretrained` folders (the parent with its tokenizer and a card).
2. For each seed and method, the same child recipe (steps, lr, batch, cosine schedule; the seed sets the child's
   initialisation and the data order): `child` alone (plain `Trainer`), `kd` (the package's KD: `HKTTrainer` with
   loss weights [1, 0, 0], CE + forward KL(parent || child) on the logits, T = 1, weight 1), HKT on the LM head's
   input with each gate (`hkt` = genetic, the reference), `hkt-layers` (decoder-layer carriers), `hkt+kd`.
3. Validation perplexity every `eval_every` steps on a fixed subset of the validation blocks (a curve: nothing is
   chosen with it), test perplexity once after the last step; the gate statistics of every carrier at every log.

Each finished run is appended at once to the results log `<out>/language_model.jsonl` (`harness.RunLog`, with the
commit it ran at) and skipped when the command runs again. The table (`.md`), the plot of the validation curves
(`.png`) and the best child (lowest test perplexity, with its model card) are regenerated from the log after each
invocation:

    python benchmarks/language_model.py                     # full run (resumable), results in benchmarks/results/
    python benchmarks/language_model.py --report            # table, plot and best child again from the log
    python benchmarks/language_model.py --quick --out DIR   # smoke run, tiny sizes, < 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from comparison import kd_settings
from harness import CACHE, RESULTS, RunLog, benchmark_parser, by_method, commands_line, notes_lines, run_missing
from harness import run_or_report, write_report
from lm_task import DATA_DIR, DATASET, FULL_SIZES, HEAD_CARRIER, LMSizes, child_config, lm_args, new_model, perplexity
from lm_task import prepare, set_license, strided
from transformers import Trainer, default_data_collator

from hkt_hf import HKTTrainer, HKTTrainingArguments

LOG_NAME = "language_model.jsonl"
KD = dict(hkt_kd_weight=1.0, hkt_kd_temperature=1.0)  # the KD term of the HKT + KD variants
LAYERS = "layers"  # stands for the decoder-layer carriers, which depend on the two depths (`layer_carriers`)
# The HKTTrainingArguments of each method; None = the child alone (plain Trainer).
METHODS: dict[str, dict[str, Any] | None] = {
    "child": None,
    "kd": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=1.0, temperature=1.0)),
    "hkt": dict(hkt_carriers=[HEAD_CARRIER]),
    "hkt-layers": dict(hkt_carriers=LAYERS),
    "hkt+kd": dict(hkt_carriers=[HEAD_CARRIER], **KD),
    "hkt-agreement": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="agreement"),
    "hkt-learned": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="learned"),
    "hkt-static": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="static"),
    "hkt-layers+kd": dict(hkt_carriers=LAYERS, **KD),
}
DESCRIPTIONS = {
    "child": "child alone (plain `Trainer`)",
    "kd": "KD: CE + forward KL(parent, child) on logits, T = 1, weight 1 (`HKTTrainer`, loss weights [1, 0, 0])",
    "hkt": "HKT, LM-head input, genetic gate (reference: lambda 0.6, weights [1, 1, 1])",
    "hkt-layers": "HKT, decoder-layer carriers, genetic gate",
    "hkt+kd": "HKT reference + KD term (T = 1, weight 1)",
    "hkt-agreement": "HKT, LM-head input, agreement gate",
    "hkt-learned": "HKT, LM-head input, learned gate",
    "hkt-static": "HKT, LM-head input, static gate (0.7 p + 0.3 q)",
    "hkt-layers+kd": "HKT, decoder-layer carriers + KD term (T = 1, weight 1)",
}
FULL = dict(sizes=FULL_SIZES, steps=180, eval_every=20, eval_blocks=256)
QUICK = dict(sizes=LMSizes(vocab_size=300, block_size=32, parent_layers=3, parent_hidden=64, parent_heads=2,
                           parent_steps=15, batch_size=8, lr=3e-3, train_rows=60, eval_rows=3),
             steps=8, eval_every=4, eval_blocks=32)
# How the full sizes were chosen: single runs of 8 steps (one validation of 256 blocks included) at the full model
# sizes, measured on 2026-11-30 on the 2-core machine while other jobs kept its load average near 7, one torch thread.
SIZING = (
    "measured s / step at full sizes under a load average of ~7 (1 thread, 8 steps incl. one validation): "
    "child 0.98, kd 2.06, hkt 2.36, hkt-layers 3.27, hkt+kd 3.20, parent 1.82; one HKT run in a quiet moment "
    "(2 threads) took 0.52 s / step, about 4.5 times faster. Projected on 2 free cores: parent 800 steps ~5-6 min, "
    "8 methods x 3 seeds x 180 steps ~35-38 min, data and tokenizer ~1 min: ~45 min in all (about 3 h under the "
    "measured load). `--steps` changes the child budget (refused for a results folder of another budget: use `--out`)"
)


def recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """Everything that must match for runs to be comparable; stored in the JSON and checked on resume."""
    return dict(sizes=asdict(settings["sizes"]), steps=settings["steps"], eval_every=settings["eval_every"],
                eval_blocks=settings["eval_blocks"], schedule="AdamW, cosine, 5 % warm-up, weight decay 0.01")


def layer_carriers(parent_layers: int, child_layers: int) -> list[str]:
    """Each child decoder layer's output takes the output of the parent layer at the same relative depth (the last
    child layer takes the last parent layer's)."""
    return [f"model.layers.{(i + 1) * parent_layers // child_layers - 1}=model.layers.{i}" for i in range(child_layers)]


def trainer_for(method: str, seed: int, rec: dict[str, Any], run_dir: Path, data, tokenizer, parent) -> Trainer:
    sizes = rec["sizes"]
    child = new_model(child_config(parent.config), seed=seed)
    run = dict(output_dir=str(run_dir), seed=seed, max_steps=rec["steps"], learning_rate=sizes["lr"],
               per_device_train_batch_size=sizes["batch_size"], logging_steps=rec["eval_every"],
               eval_strategy="steps", eval_steps=rec["eval_every"])
    common = dict(train_dataset=data["train"], eval_dataset=strided(data["validation"], rec["eval_blocks"]),
                  data_collator=default_data_collator, processing_class=tokenizer)
    extra = METHODS[method]
    if extra is None:
        return Trainer(child, lm_args(**run), **common)
    if extra["hkt_carriers"] == LAYERS:
        extra = dict(extra, hkt_carriers=layer_carriers(parent.config.num_hidden_layers,
                                                        child.config.num_hidden_layers))
    return HKTTrainer(child, lm_args(HKTTrainingArguments, **run, **extra), parent_model=parent, **common)


def history(trainer: Trainer) -> dict[str, Any]:
    """The validation curve (step, perplexity) and, per carrier, the gate statistics at every training log."""
    logs = trainer.state.log_history
    curve = [[h["step"], math.exp(h["eval_loss"])] for h in logs if "eval_loss" in h]
    gates: dict[str, dict[str, list]] = {}
    for h in logs:
        for key, value in h.items():
            if key.startswith("hkt/") and key.endswith(("/gate_mean", "/mix_weight_mean")):
                carrier, stat = key[len("hkt/"):].rsplit("/", 1)
                gates.setdefault(carrier, {}).setdefault(stat, []).append([h["step"], value])
    return {"validation_curve": curve, "gates": gates}


def run_all(opts: argparse.Namespace, argv: list[str]) -> Path:
    settings = dict(QUICK if opts.quick else FULL)
    if opts.steps:
        settings["steps"] = opts.steps
    rec = recipe(settings)
    out: Path = opts.out or (opts.cache / "quick-results" if opts.quick else RESULTS)
    log = RunLog.open(out / LOG_NAME, rec)
    finish = log.start_command("benchmarks/language_model.py", argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tokenizer, data, parent, info = prepare(opts.data_dir, settings["sizes"], opts.cache)
    log.set_reference("parent", {**info, "folder": log.relative(opts.cache / f"parent-{settings['sizes'].key()}")})
    log.set_reference("blocks", {split: len(ds) for split, ds in data.items()})


    def run(method: str, seed: int) -> dict[str, Any]:
        run_dir = opts.cache / "runs" / out.name / method / f"seed{seed}"
        return {**run_one(method, seed, rec, run_dir, data, tokenizer, parent), "folder": log.relative(run_dir)}

    run_missing(log, opts.seeds, opts.methods, run)
    finish()
    report(out, opts.cache)
    return log.path


def run_one(method: str, seed: int, rec: dict[str, Any], run_dir: Path, data, tokenizer, parent) -> dict[str, Any]:
    """Train one child, score it on the test blocks and save it with the card of the package's trainer."""
    run_start = time.perf_counter()
    trainer = trainer_for(method, seed, rec, run_dir, data, tokenizer, parent)
    trainer.train()
    train_s = time.perf_counter() - run_start
    test = perplexity(trainer.evaluate(data["test"], metric_key_prefix="test"), "test")
    trainer.save_model()
    trainer.create_model_card(model_name=f"python-stdlib-llama-child-{method}", language="code",
                              tags=["llama", "python", method],
                              dataset=DATASET, tasks="text-generation")
    set_license(run_dir / "README.md")
    return {"method": method, "seed": seed, "settings": METHODS[method], "test_perplexity": test, "train_s": train_s,
            "run_s": time.perf_counter() - run_start, **history(trainer)}


# ---- report ---------------------------------------------------------------------------------------------------


def final(series: list[list[float]]) -> float:
    return series[-1][1]


def summarise(log: RunLog) -> dict[str, dict[str, Any]]:
    """Per method: seeds, test perplexities (`values`), mean and sample std, mean seconds per run, and per carrier
    the last logged gate mean and mixing weight of each seed."""
    rows = by_method(log.runs.values(), "test_perplexity", METHODS)
    for method, row in rows.items():
        row["gates"] = {}
        for run in (r for r in log.runs.values() if r["method"] == method):
            for carrier, stats in run["gates"].items():
                for stat, series in stats.items():
                    row["gates"].setdefault(carrier, {}).setdefault(stat, []).append(final(series))
    return rows


def markdown_table(log: RunLog) -> str:
    rec, parent = log.recipe, log.reference.get("parent", {})
    sizes = rec["sizes"]
    lines = ["| method | seeds | test perplexity (mean +- std) | per seed | final gate a / mixing weight | s / run |",
             "|---|---|---|---|---|---|"]
    for method, row in summarise(log).items():
        per_seed = ", ".join(f"{p:.2f}" for _, p in sorted(zip(row["seeds"], row["values"])))
        gates = "; ".join(f"`{c}`: {statistics.fmean(s['gate_mean']):.3f} / "
                          f"{statistics.fmean(s['mix_weight_mean']):.3f}" for c, s in row["gates"].items()) or "-"
        lines.append(f"| {DESCRIPTIONS[method]} | {len(row['values'])} | {row['mean']:.2f} +- {row['std']:.2f} | "
                     f"{per_seed} | {gates} | {row['mean_train_s']:.0f} |")
    if parent:
        lines += ["", f"Parent ({sizes['parent_layers']} layers, hidden {sizes['parent_hidden']}, {parent['params']:,} "
                      f"parameters, plain `Trainer`, {parent['steps']} steps, {parent['train_s']:.0f} s): validation "
                      f"perplexity {parent['validation_perplexity']:.2f}, test perplexity "
                      f"{parent['test_perplexity']:.2f}."]
    blocks_text = ", ".join(f"{split} {n}" for split, n in log.reference.get("blocks", {}).items())
    lines += [
        "",
        f"Recipe: tokenizer byte-level BPE, {sizes['vocab_size']} tokens, trained on the train split; blocks of "
        f"{sizes['block_size']} tokens ({blocks_text}); child = a third of the parent's layers, half its width; "
        f"{rec['steps']} optimizer steps per child run, batch {sizes['batch_size']}, lr {sizes['lr']}, "
        f"{rec['schedule']}, fp32. Validation perplexity every {rec['eval_every']} steps on {rec['eval_blocks']} "
        "strided validation blocks (curve only); test perplexity on every test block, once, after the last step. "
        "Gate columns: the last logged mean gate a and mixing weight per carrier, averaged over seeds. "
        "s / run: training seconds including the periodic validation.",
        "",
        f"Sizing: {SIZING}.",
        "",
        commands_line(log.commands.values()),
        *notes_lines(log.runs),
    ]
    return "\n".join(lines)


def plot(log: RunLog, path: Path) -> None:
    """Validation perplexity against step, mean over seeds per method, with the parent's as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in summarise(log):
        curves = [r["validation_curve"] for r in log.runs.values() if r["method"] == method]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=f"{method} (n={len(curves)})",
                linestyle="-" if method.startswith("hkt") else "--")
    parent = log.reference.get("parent")
    if parent:
        ax.axhline(parent["validation_perplexity"], color="black", linestyle=":", label="parent (full validation)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity (subset)")
    ax.set_title("Llama child on python-stdlib: validation perplexity, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, cache: Path) -> None:
    """Table and plot from `<out>/language_model.jsonl`; the best child's folder (with its card) copied to
    `<cache>/best-child-<out name>` when its run folder is on this machine."""
    log = RunLog.read(out / LOG_NAME)
    write_report(out, "language_model", "Causal language model on python-stdlib: test perplexity", markdown_table(log),
                 lambda path: plot(log, path))
    if log.runs:
        best = log.resolve(min(log.runs.values(), key=lambda r: r["test_perplexity"])["folder"])
        if best.is_dir():
            shutil.copytree(best, cache / f"best-child-{out.name}", dirs_exist_ok=True)
    print(markdown_table(log))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], METHODS, METHODS, CACHE / "language_model",
                              "tiny sizes: a smoke run")
    parser.add_argument("--data_dir", type=Path, default=DATA_DIR, help="the python-stdlib parquet folder")
    opts = parser.parse_args(argv)
    return run_or_report(opts, argv, run_all, lambda out: report(out, opts.cache))


if __name__ == "__main__":
    raise SystemExit(main())
