"""Perplexity of a small Llama-style child language model trained alone, with KD, with feature-distillation baselines
and with HKT variants, each at its own learning rate, on the python-stdlib corpus (CPython's standard library source;
`../shared/data/python-stdlib`).

The task (tokenizer, blocks, models) is `benchmarks/lm_task.py`, which `examples/language_modeling.py` uses too. The
protocol, per results folder (one child initialisation, `--child-init`):

1. Rate sweep: every method at every rate of `--lrs` on seed 0, `recipe steps` steps. Each run ends with a final
   validation perplexity on a fixed strided subset of the validation blocks (`eval_blocks`), which chooses the rate
   of each method (lowest wins); the test blocks are scored too but choose nothing.
2. Seeds: every method (or, with `--top K`, the K best on mean validation) at its chosen rate on each of `--seeds`,
   for `--steps` steps (default the recipe's; more steps reuse the rate chosen at the recipe's budget).
3. Report: methods ranked on validation perplexity (mean +- std over seeds); test perplexity reported beside it, on
   every test block (no drop-last); the chosen rate, n and the step time (train_s / steps, periodic validation
   included) of each; the sweep; the gate statistics of the HKT runs.

Every run is appended at once to `<out>/language_model.jsonl` keyed `method/lr<rate>/seed<k>[/steps<n>]` with its
commit, steps, rate and times (`harness.RunLog`), and skipped when the command runs again. The table (`.md`), the
plot of validation curves (`.png`) and the best child (lowest validation perplexity, with its card) are regenerated
after each invocation:

    python benchmarks/language_model.py --out DIR --lrs 3e-4 1e-3 3e-3 --seeds 0 1 2   # steps 1-2 (resumable)
    python benchmarks/language_model.py --out DIR --lrs 3e-4 1e-3 3e-3 --seeds 0 1 2 --steps 720 --top 3
    python benchmarks/language_model.py --out DIR --report                                # the report again
    python benchmarks/language_model.py --quick --out DIR --lrs 1e-3 3e-3 1e-2            # smoke run, tiny sizes
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
from baselines import BaselineTrainer
from comparison import kd_settings
from harness import CACHE, RESULTS, RunLog, benchmark_parser, commands_line, mean_text, notes_lines, run_or_report
from harness import write_report
from lm_task import DATA_DIR, DATASET, FULL_SIZES, HEAD_CARRIER, LMSizes, child_config, layer_carriers, lm_args
from lm_task import new_model, prepare, set_license, strided
from rate_protocol import add_rate_options, check_rate_options, choose_rates, chosen_runs, edge_choices, protocol
from rate_protocol import run_key, sweep_table
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, default_data_collator

from hkt_hf import HKTTrainer, HKTTrainingArguments

LOG_NAME = "language_model.jsonl"
KD = dict(hkt_kd_weight=1.0, hkt_kd_temperature=1.0)  # the KD term of the HKT + KD variants
# The mean logged mixing weight of `hkt-layers+kd` at its chosen rate (3e-3; both carriers, every logged step,
# seeds 0-2 of benchmarks/results/lm-tuned): the constant gate that takes the same share of the parent everywhere.
CONSTANT_LAMBDA = 0.28
LAYERS = "layers"  # stands for the decoder-layer carriers, which depend on the two depths (`layer_carriers`)
# Per method: HKTTrainingArguments fields, or {"baseline": BaselineTrainer options}; None = the child alone.
METHODS: dict[str, dict[str, Any] | None] = {
    "child": None,
    "kd": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=1.0, temperature=1.0)),
    "kd-t2": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=1.0, temperature=2.0)),
    "kd-t4": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=1.0, temperature=4.0)),
    "kd-w0.5": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=0.5, temperature=1.0)),
    "kd-w2": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=2.0, temperature=1.0)),
    "kd-w4": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=4.0, temperature=1.0)),
    "kd-w8": dict(hkt_carriers=[HEAD_CARRIER], **kd_settings(weight=8.0, temperature=1.0)),
    "kd-only": dict(hkt_carriers=[HEAD_CARRIER], **dict(kd_settings(weight=1.0, temperature=1.0),
                                                         hkt_loss_weights=[0.0, 0.0, 0.0])),
    "hint+kd": dict(baseline=dict(hint="mse", kd_weight=1.0, kd_temperature=1.0)),
    "hint+kd2": dict(baseline=dict(hint="mse", kd_weight=2.0, kd_temperature=1.0)),
    "hint+kd4": dict(baseline=dict(hint="mse", kd_weight=4.0, kd_temperature=1.0)),
    "hint+kd8": dict(baseline=dict(hint="mse", kd_weight=8.0, kd_temperature=1.0)),
    "hint+kd16": dict(baseline=dict(hint="mse", kd_weight=16.0, kd_temperature=1.0)),
    "hint0.3+kd4": dict(baseline=dict(hint="mse", weight=0.3, kd_weight=4.0, kd_temperature=1.0)),
    "hint0.3+kd": dict(baseline=dict(hint="mse", weight=0.3, kd_weight=1.0, kd_temperature=1.0)),
    "hint3+kd": dict(baseline=dict(hint="mse", weight=3.0, kd_weight=1.0, kd_temperature=1.0)),
    "hint-cos+kd": dict(baseline=dict(hint="cosine", kd_weight=1.0, kd_temperature=1.0)),
    "stitch": dict(baseline=dict(stitch=True)),
    "hkt": dict(hkt_carriers=[HEAD_CARRIER]),
    "hkt-layers": dict(hkt_carriers=LAYERS),
    "hkt+kd": dict(hkt_carriers=[HEAD_CARRIER], **KD),
    "hkt-agreement": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="agreement"),
    "hkt-learned": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="learned"),
    "hkt-static": dict(hkt_carriers=[HEAD_CARRIER], hkt_gate="static"),
    "hkt-layers+kd": dict(hkt_carriers=LAYERS, **KD),
    "hkt-layers+kd2": dict(hkt_carriers=LAYERS, hkt_kd_weight=2.0, hkt_kd_temperature=1.0),
    "hkt-layers+kd4": dict(hkt_carriers=LAYERS, hkt_kd_weight=4.0, hkt_kd_temperature=1.0),
    "hkt-layers+kd-no-lc": dict(hkt_carriers=LAYERS, hkt_loss_weights=[1.0, 0.0, 1.0], **KD),
    "hkt-layers+kd-no-lp": dict(hkt_carriers=LAYERS, hkt_loss_weights=[1.0, 1.0, 0.0], **KD),
    "hkt-layers+kd-static": dict(hkt_carriers=LAYERS, hkt_gate="static", **KD),
    "hkt-layers+kd-constant": dict(hkt_carriers=LAYERS, hkt_gate="constant", hkt_lambda=CONSTANT_LAMBDA, **KD),
    # HKT's terms on top of the best hint + KD (hint 1, KD 8), the hint through HKT's child -> parent aligners; and
    # the same objective without the mixing terms (the package's hint + KD, the control of the HKT terms' effect).
    "hkt-layers+hint+kd8": dict(hkt_carriers=LAYERS, hkt_hint_weight=1.0, hkt_kd_weight=8.0, hkt_kd_temperature=1.0),
    "hkt-layers+hint+kd": dict(hkt_carriers=LAYERS, hkt_hint_weight=1.0, **KD),
    "hkt-hint+kd8": dict(hkt_carriers=LAYERS, hkt_loss_weights=[1.0, 0.0, 0.0], hkt_hint_weight=1.0,
                         hkt_kd_weight=8.0, hkt_kd_temperature=1.0),
}
DESCRIPTIONS = {
    "child": "child alone (plain `Trainer`)",
    "kd": "KD: CE + forward KL(parent, child) on logits, T = 1, weight 1 (`HKTTrainer`, loss weights [1, 0, 0])",
    "kd-t2": "KD at T = 2 (weight 1)",
    "kd-t4": "KD at T = 4 (weight 1)",
    "kd-w0.5": "KD at weight 0.5 (T = 1)",
    "kd-w2": "KD at weight 2 (T = 1)",
    "kd-w4": "KD at weight 4 (T = 1)",
    "kd-w8": "KD at weight 8 (T = 1)",
    "kd-only": "KL-only KD: forward KL(parent, child), no CE (loss weights [0, 0, 0], KD weight 1, T = 1)",
    "hint+kd": "hint + KD: MSE(projection of child layer, parent layer) at the decoder-layer pairs + KD (FitNets)",
    "hint+kd2": "hint + KD at KD weight 2 (hint weight 1)",
    "hint+kd4": "hint + KD at KD weight 4 (hint weight 1)",
    "hint+kd8": "hint + KD at KD weight 8 (hint weight 1)",
    "hint+kd16": "hint + KD at KD weight 16 (hint weight 1)",
    "hint0.3+kd4": "hint + KD at hint weight 0.3, KD weight 4",
    "hint0.3+kd": "hint + KD at hint weight 0.3 (KD weight 1)",
    "hint3+kd": "hint + KD at hint weight 3 (KD weight 1)",
    "hint-cos+kd": "hint + KD, cosine variant (DistilBERT): 1 - cos(projection, parent layer) + KD",
    "stitch": "stitching: projected child layer -> frozen parent's upper layers and head, CE, no gate (SRRL-like)",
    "hkt": "HKT, LM-head input, genetic gate (reference: lambda 0.6, weights [1, 1, 1])",
    "hkt-layers": "HKT, decoder-layer carriers, genetic gate",
    "hkt+kd": "HKT reference + KD term (T = 1, weight 1)",
    "hkt-agreement": "HKT, LM-head input, agreement gate",
    "hkt-learned": "HKT, LM-head input, learned gate",
    "hkt-static": "HKT, LM-head input, static gate (0.7 p + 0.3 q)",
    "hkt-layers+kd": "HKT, decoder-layer carriers + KD term (T = 1, weight 1)",
    "hkt-layers+kd2": "hkt-layers+kd at KD weight 2",
    "hkt-layers+kd4": "hkt-layers+kd at KD weight 4",
    "hkt-layers+kd-no-lc": "hkt-layers+kd without L_c* (loss weights [1, 0, 1])",
    "hkt-layers+kd-no-lp": "hkt-layers+kd without L_p* (loss weights [1, 1, 0])",
    "hkt-layers+kd-static": "hkt-layers+kd with the constant `static` gate (0.7 p + 0.3 q)",
    "hkt-layers+kd-constant": f"hkt-layers+kd with the `constant` gate at hkt-layers+kd's mean mixing weight "
                              f"(lambda {CONSTANT_LAMBDA})",
    "hkt-layers+hint+kd8": "HKT, decoder-layer carriers + hint (weight 1, `hkt_hint_weight`) + KD (weight 8): HKT's "
                           "terms on top of the best hint + KD",
    "hkt-layers+hint+kd": "HKT, decoder-layer carriers + hint (weight 1) + KD (weight 1)",
    "hkt-hint+kd8": "the package's hint + KD alone (loss weights [1, 0, 0], hint 1, KD 8): hint+kd8 through HKT's "
                    "aligners, without the mixing terms",
}
CHILD_INITS = {
    "random": "random, a third of the parent's layers at half its width",
    "same-width": "random, a third of the parent's layers at its width (the control of parent-layers)",
    "parent-layers": "the parent's embeddings, final norm, head and every k-th decoder layer (0, k, 2k...), its width",
}
FULL = dict(sizes=FULL_SIZES, steps=180, eval_every=20, eval_blocks=256)
QUICK = dict(sizes=LMSizes(vocab_size=300, block_size=32, parent_layers=3, parent_hidden=64, parent_heads=2,
                           parent_steps=15, batch_size=8, lr=3e-3, train_rows=60, eval_rows=3),
             steps=8, eval_every=4, eval_blocks=32)


def recipe(settings: dict[str, Any], child_init: str) -> dict[str, Any]:
    """Everything that must match for runs to be comparable; stored in the JSON and checked on resume. `steps` is
    the budget of the rate sweep (longer runs are keyed by their steps)."""
    return dict(sizes=asdict(settings["sizes"]), steps=settings["steps"], eval_every=settings["eval_every"],
                eval_blocks=settings["eval_blocks"], child_init=child_init,
                schedule="AdamW, cosine, 5 % warm-up, weight decay 0.01")


def new_child(parent: LlamaForCausalLM, seed: int, init: str) -> LlamaForCausalLM:
    """The child of `init` (see CHILD_INITS); `seed` sets its random initialisation (parent-layers: none)."""
    if init == "random":
        return new_model(child_config(parent.config), seed=seed)
    config = LlamaConfig.from_dict(parent.config.to_dict())
    config.num_hidden_layers = child_config(parent.config).num_hidden_layers
    child = new_model(config, seed=seed)
    if init == "parent-layers":
        child.load_state_dict(inherited_state(parent, config.num_hidden_layers))
    return child


def inherited_state(parent: LlamaForCausalLM, child_layers: int) -> dict[str, torch.Tensor]:
    """The parent's weights for a same-width child of `child_layers` layers: child layer j is parent layer
    j * p // c (DistilBERT-style, every k-th from the first); embeddings, final norm and head as they are."""
    parent_layers = parent.config.num_hidden_layers
    state = {}
    for name, tensor in parent.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor.clone()
    for j in range(child_layers):
        prefix = f"model.layers.{j * parent_layers // child_layers}."
        for name, tensor in parent.state_dict().items():
            if name.startswith(prefix):
                state[f"model.layers.{j}." + name[len(prefix):]] = tensor.clone()
    return state


def trainer_for(method: str, seed: int, lr: float, steps: int, rec: dict[str, Any], run_dir: Path, data, tokenizer,
                parent) -> Trainer:
    sizes = rec["sizes"]
    child = new_child(parent, seed, rec["child_init"])
    run = dict(output_dir=str(run_dir), seed=seed, max_steps=steps, learning_rate=lr,
               per_device_train_batch_size=sizes["batch_size"], logging_steps=rec["eval_every"],
               eval_strategy="steps", eval_steps=rec["eval_every"])
    common = dict(train_dataset=data["train"], eval_dataset=strided(data["validation"], rec["eval_blocks"]),
                  data_collator=default_data_collator, processing_class=tokenizer)
    extra = METHODS[method]
    if extra is None:
        return Trainer(child, lm_args(**run), **common)
    pairs = layer_carriers(parent.config.num_hidden_layers, child.config.num_hidden_layers)
    if "baseline" in extra:
        return BaselineTrainer(child, lm_args(**run), parent_model=parent, pairs=pairs, **extra["baseline"], **common)
    if extra["hkt_carriers"] == LAYERS:
        extra = dict(extra, hkt_carriers=pairs)
    return HKTTrainer(child, lm_args(HKTTrainingArguments, **run, **extra), parent_model=parent, **common)


def block_perplexity(model: torch.nn.Module, blocks, batch_size: int = 32) -> tuple[float, int]:
    """Perplexity over every block of `blocks` (the last partial batch included, unlike the recipe's drop-last
    Trainer loaders) and the number of blocks scored. Every block has the same length, so the mean of the
    per-block mean token losses, weighted by rows, is the per-token mean."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            ids = batch["input_ids"].to(model.device)
            loss = model(input_ids=ids, labels=batch["labels"].to(model.device), use_cache=False).loss
            total, count = total + loss.item() * len(ids), count + len(ids)
    return math.exp(total / count), count


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


def run_one(method: str, seed: int, lr: float, steps: int, rec: dict[str, Any], run_dir: Path, data, tokenizer,
            parent) -> dict[str, Any]:
    """Train one child, score it on the validation subset and every test block, save it with its trainer's card."""
    run_start = time.perf_counter()
    trainer = trainer_for(method, seed, lr, steps, rec, run_dir, data, tokenizer, parent)
    trainer.train()
    train_s = time.perf_counter() - run_start
    validation, _ = block_perplexity(trainer.model, strided(data["validation"], rec["eval_blocks"]))
    test, test_blocks = block_perplexity(trainer.model, data["test"])
    trainer.save_model()
    trainer.create_model_card(model_name=f"python-stdlib-llama-child-{method}", language="code",
                              tags=["llama", "python", method], dataset=DATASET, tasks="text-generation")
    set_license(run_dir / "README.md")
    return {"method": method, "seed": seed, "lr": lr, "steps": steps, "child_init": rec["child_init"],
            "settings": METHODS[method], "validation_perplexity": validation, "test_perplexity": test,
            "test_blocks": test_blocks, "train_s": train_s, "step_s": train_s / steps,
            "run_s": time.perf_counter() - run_start, **history(trainer)}


# ---- protocol ---------------------------------------------------------------------------------------------------


def score(run: dict[str, Any]) -> float:
    """What chooses rates and ranks methods (lower is better): the final validation perplexity."""
    return run["validation_perplexity"]


def run_all(opts: argparse.Namespace, argv: list[str]) -> Path:
    settings = dict(QUICK if opts.quick else FULL)
    rec = recipe(settings, opts.child_init)
    out: Path = opts.out or (opts.cache / "quick-results" if opts.quick else RESULTS)
    log = RunLog.open(out / LOG_NAME, rec)
    finish = log.start_command("benchmarks/language_model.py", argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tokenizer, data, parent, info = prepare(opts.data_dir, settings["sizes"], opts.cache)
    log.set_reference("parent", {**info, "folder": log.relative(opts.cache / f"parent-{settings['sizes'].key()}")})
    log.set_reference("blocks", {split: len(ds) for split, ds in data.items()})

    def run(method: str, lr: float, seed: int, steps: int) -> dict[str, Any]:
        run_dir = opts.cache / "runs" / out.name / run_key(method, lr, seed, steps, rec["steps"])
        record = run_one(method, seed, lr, steps, rec, run_dir, data, tokenizer, parent)
        return {**record, "folder": log.relative(run_dir)}

    protocol(log, opts.methods, opts.lrs or [settings["sizes"].lr], opts.seeds, opts.steps or rec["steps"], opts.top,
             run, score)
    finish()
    report(out, opts.cache)
    return log.path


# ---- report ---------------------------------------------------------------------------------------------------


def complete(run: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """A run of a log made before the rate protocol, with its rate and steps (the recipe's) and, as its validation
    perplexity, the last point of its curve (256 blocks, a multiple of the eval batch: none dropped)."""
    return {"lr": rec["sizes"]["lr"], "steps": rec["steps"],
            "validation_perplexity": run["validation_curve"][-1][1], **run}


def gates_text(runs: list[dict[str, Any]]) -> str:
    """Per carrier: the last logged mean gate a and mixing weight, averaged over the runs."""
    stats: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for carrier, series in run.get("gates", {}).items():
            for stat, points in series.items():
                stats.setdefault(carrier, {}).setdefault(stat, []).append(points[-1][1])
    return "; ".join(f"`{c}`: {statistics.fmean(s['gate_mean']):.3f} / {statistics.fmean(s['mix_weight_mean']):.3f}"
                     for c, s in stats.items()) or "-"


def ranked_table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| rank | method | rate | n | validation perplexity | test perplexity | s / step | final gate a / mixing "
             "weight |", "|---|---|---|---|---|---|---|---|"]
    for rank, (method, runs) in enumerate(rows.items(), 1):
        lines.append(f"| {rank} | {DESCRIPTIONS.get(method, method)} (`{method}`) | {runs[0]['lr']:g} | {len(runs)} | "
                     f"{mean_text([r['validation_perplexity'] for r in runs])} | "
                     f"{mean_text([r['test_perplexity'] for r in runs])} | "
                     f"{statistics.fmean(r['train_s'] / r['steps'] for r in runs):.2f} | {gates_text(runs)} |")
    return lines


def paired_lines(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The two best methods seed by seed (the same seed: the same child initialisation and data order): how much
    lower the leader's validation and test perplexity was on each seed they share."""
    if len(rows) < 2:
        return []
    (first, first_runs), (second, second_runs) = list(rows.items())[:2]
    a, b = ({r["seed"]: r for r in runs} for runs in (first_runs, second_runs))
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        return []
    gaps = {metric: [b[s][f"{metric}_perplexity"] - a[s][f"{metric}_perplexity"] for s in seeds]
            for metric in ("validation", "test")}
    every = "on every shared seed" if all(g > 0 for g in gaps["validation"] + gaps["test"]) else "not on every seed"
    return ["", f"Paired by seed ({', '.join(map(str, seeds))}): `{first}` below `{second}` by "
                f"{', '.join(f'{g:.2f}' for g in gaps['validation'])} validation and "
                f"{', '.join(f'{g:.2f}' for g in gaps['test'])} test perplexity ({every})."]


def ranked_lines(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The ranked table of one step budget and its seed-by-seed comparison of the two best."""
    return [*ranked_table(rows), *paired_lines(rows)]


def markdown_table(log: RunLog) -> str:
    rec, parent = log.recipe, log.reference.get("parent", {})
    sizes, base = rec["sizes"], rec["steps"]
    runs = [complete(r, rec) for r in log.runs.values()]
    rates = choose_rates(runs, base, score)
    lines = [f"Ranked on validation perplexity at {base} steps (each method at its chosen rate; mean +- std over "
             "seeds); test perplexity reported, never used to choose.", "",
             *ranked_lines(chosen_runs(runs, rates, base, score))]
    for steps in sorted({r["steps"] for r in runs} - {base}):
        lines += ["", f"At {steps} steps (the rate chosen at {base}):", "",
                  *ranked_lines(chosen_runs(runs, rates, steps, score))]
    lines += ["", "Rate sweep (seed 0, validation perplexity; bold: chosen):", "",
              *sweep_table(runs, base, rates, "validation_perplexity", "validation perplexity")]
    edge = edge_choices(runs, base, rates)
    if edge:
        lines += ["", f"Chosen at the edge of the sweep (extend it with one more rate beyond): {', '.join(edge)}."]
    if parent:
        lines += ["", f"Parent ({sizes['parent_layers']} layers, hidden {sizes['parent_hidden']}, {parent['params']:,} "
                      f"parameters, plain `Trainer`, {parent['steps']} steps, {parent['train_s']:.0f} s): validation "
                      f"perplexity {parent['validation_perplexity']:.2f}, test perplexity "
                      f"{parent['test_perplexity']:.2f}."]
    blocks_text = ", ".join(f"{split} {n}" for split, n in log.reference.get("blocks", {}).items())
    lines += [
        "",
        f"Recipe: tokenizer byte-level BPE, {sizes['vocab_size']} tokens, trained on the train split; blocks of "
        f"{sizes['block_size']} tokens ({blocks_text}); child: {CHILD_INITS[rec.get('child_init', 'random')]}; "
        f"{base} optimizer steps per sweep run, batch {sizes['batch_size']}, {rec['schedule']}, fp32. Validation "
        f"perplexity on {rec['eval_blocks']} strided validation blocks (every {rec['eval_every']} steps for the curve, "
        "and once after the last step: what ranks and chooses); test perplexity on every test block, once, after the "
        "last step. Gate columns: the last logged mean gate a and mixing weight per carrier, averaged over seeds. "
        "s / step: training seconds (periodic validation included) over steps.",
        "",
        commands_line(log.commands.values()),
        *notes_lines(log.runs),
    ]
    return "\n".join(lines)


def plot(log: RunLog, path: Path) -> None:
    """Validation perplexity against step at the sweep's budget, mean over seeds per method at its chosen rate, with
    the parent's as a line."""
    import matplotlib.pyplot as plt

    runs, base = [complete(r, log.recipe) for r in log.runs.values()], log.recipe["steps"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, chosen in chosen_runs(runs, choose_rates(runs, base, score), base, score).items():
        curves = [r["validation_curve"] for r in chosen]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, marker=".", label=f"{method} (n={len(curves)}, lr {chosen[0]['lr']:g})",
                linestyle="-" if method.startswith("hkt") else "--")
    parent = log.reference.get("parent")
    if parent:
        ax.axhline(parent["validation_perplexity"], color="black", linestyle=":", label="parent (full validation)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity (subset)")
    ax.set_title("Llama child on python-stdlib: validation perplexity, mean over seeds")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, cache: Path) -> None:
    """Table and plot from `<out>/language_model.jsonl`; the best child on validation (its folder, with its card)
    copied to `<cache>/best-child-<out name>` when its run folder is on this machine."""
    log = RunLog.read(out / LOG_NAME)
    write_report(out, "language_model", "Causal language model on python-stdlib: perplexity at each method's rate",
                 markdown_table(log), lambda path: plot(log, path))
    if log.runs:
        runs = [complete(r, log.recipe) for r in log.runs.values()]
        best = log.resolve(min(runs, key=score)["folder"])
        if best.is_dir():
            shutil.copytree(best, cache / f"best-child-{out.name}", dirs_exist_ok=True)
    print(markdown_table(log))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], METHODS, METHODS, CACHE / "language_model",
                              "tiny sizes: a smoke run")
    parser.add_argument("--data_dir", type=Path, default=DATA_DIR, help="the python-stdlib parquet folder")
    add_rate_options(parser, FULL_SIZES.lr)
    parser.add_argument("--child-init", dest="child_init", choices=list(CHILD_INITS), default="random",
                        help="the child (part of the recipe: one results folder per choice)")
    next(a for a in parser._actions if a.dest == "steps").help = (
        "steps of the seed runs (default: the recipe's; the rate is the one chosen at the recipe's steps)")
    opts = parser.parse_args(argv)
    check_rate_options(parser, opts)
    if opts.steps is not None and opts.steps < 1:
        parser.error(f"--steps must be at least 1, got {opts.steps}")
    return run_or_report(opts, argv, run_all, lambda out: report(out, opts.cache))


if __name__ == "__main__":
    raise SystemExit(main())
