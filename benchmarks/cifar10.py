"""Final test accuracy of a ResNet-20 child trained alone, with KD and with HKT, on the shared CIFAR-10 (JPEG).

One recipe for every method (SGD lr 0.01 momentum 0.9 weight decay 1e-4, batch 128, cosine schedule to 0, random
crop pad 4 + flip, ImageNet mean/std, fp32, a fixed number of optimizer steps):

1. Parent: the pretrained ResNet-56, first adapted to the JPEG training split with this recipe (cached).
2. Child: the pretrained ResNet-20, trained by each method with the same recipe, for every seed.
3. Every child is scored once, at the end, on the full test split in fp32. Nothing is selected on the test set.

Each finished run is appended at once to the results log `<out>/cifar10.jsonl` (`harness.RunLog`, with the commit
it ran at) and skipped when the command runs again, so the table can be completed across sessions:

    python benchmarks/cifar10.py                 # full run (resumable), results in benchmarks/results/
    python benchmarks/cifar10.py --report        # table, plot and model card again from the log
    python benchmarks/cifar10.py --quick --out DIR      # smoke run on subsets (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from common import BATCH_SIZE, CHECKPOINTS, LR, MOMENTUM, PADDING, WEIGHT_DECAY, CifarTensors, decoded_split
from common import load_pretrained, prepare, recipe_args
from baselines import BaselineTrainer
from comparison import kd_settings
from harness import CACHE, REPO, RESULTS, RunLog, atomic_write_json, benchmark_parser, by_method, commands_line
from harness import notes_lines, run_missing, run_or_report, write_report
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.apps.data.images import image_collator
from hkt_hf.hub import load_lineage
from hkt_hf.apps.metrics import top1_accuracy
from hkt_hf.model_card import render_model_card

LOG_NAME = "cifar10.jsonl"
MODEL_CARD = REPO / "model_cards" / "hkt-resnet20-cifar10-jpeg.md"
KD = dict(hkt_kd_weight=1.0, hkt_kd_temperature=4.0)  # the KD term of the HKT + KD variants
STAGES = [f"resnet.layer{i}" for i in (1, 2, 3)]  # the three stage outputs: HKT's `blocks` carriers of a ResNet
# The HKTTrainingArguments of each method, or {"baseline": BaselineTrainer options}; None = the child alone, with
# the plain transformers Trainer.
METHODS: dict[str, dict[str, Any] | None] = {
    "child": None,
    "kd": kd_settings(weight=1.0, temperature=4.0),  # the package's KD: HKTTrainer, loss weights [1, 0, 0]
    "hkt": {},  # the reference settings: head-input carrier, genetic gate, lambda 0.6, weights [1, 1, 1]
    "hkt+kd": dict(**KD),
    "hkt-agreement": dict(hkt_gate="agreement"),
    "hkt-learned": dict(hkt_gate="learned"),
    "hkt-layer2": dict(hkt_carriers=["resnet.layer2=resnet.layer2"]),
    "hkt-layer3": dict(hkt_carriers=["resnet.layer3=resnet.layer3"]),
    "hkt-layers": dict(hkt_carriers=[f"resnet.layer{i}=resnet.layer{i}" for i in (1, 2, 3)]),
    "hkt+kd-lambda0.3": dict(hkt_lambda=0.3, **KD),
    "hkt-blocks+kd": dict(hkt_carriers=["blocks"], **KD),
    "hint+kd": dict(baseline=dict(hint="mse", kd_weight=1.0, kd_temperature=4.0)),
    "hint0.1+kd": dict(baseline=dict(hint="mse", weight=0.1, kd_weight=1.0, kd_temperature=4.0)),
}
DESCRIPTIONS = {
    "child": "child alone (plain `Trainer`)",
    "kd": "KD: CE + T^2 KL, T = 4 (`HKTTrainer`, loss weights [1, 0, 0], kd weight 1)",
    "hkt": "HKT, reference settings (genetic gate, lambda 0.6, weights [1, 1, 1])",
    "hkt+kd": "HKT reference + KD term (T = 4, weight 1)",
    "hkt-agreement": "HKT with the agreement gate (w = lambda * a)",
    "hkt-learned": "HKT with the learned gate",
    "hkt-layer2": "HKT, carrier: `layer2` output (genetic gate)",
    "hkt-layer3": "HKT, carrier: `layer3` output (genetic gate)",
    "hkt-layers": "HKT, carriers: `layer1`, `layer2` and `layer3` outputs at once (genetic gate)",
    "hkt+kd-lambda0.3": "HKT + KD term (T = 4, weight 1), lambda 0.3",
    "hkt-blocks+kd": "HKT, `blocks` carriers (the `layer1`-`layer3` outputs) + KD term (T = 4, weight 1)",
    "hint+kd": "hint + KD: MSE(1x1-conv projection of the child's stage output, the parent's) at `layer1`-`layer3` "
               "+ KD (T = 4, weight 1) (FitNets)",
    "hint0.1+kd": "hint + KD at hint weight 0.1",
}
FULL = dict(steps=400, parent_steps=150, train_rows=None, test_rows=None, batch_size=BATCH_SIZE)
QUICK = dict(steps=6, parent_steps=3, train_rows=512, test_rows=200, batch_size=32)


def recipe(settings: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """Everything that must match for runs to be comparable; stored in the JSON and checked on resume."""
    return dict(
        settings, bf16=bf16, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, schedule="cosine, no warmup",
        augmentation=f"random_crop_flip pad {PADDING}", normalisation="ImageNet mean/std",
        child_init=CHECKPOINTS["resnet20"], parent_init=CHECKPOINTS["resnet56"],
    )


def trainer_for(method: str, model, args_dir: Path, seed: int, rec: dict[str, Any], train_ds, parent,
                lr: float = LR) -> Trainer:
    extra = METHODS[method]
    common = dict(train_dataset=train_ds, data_collator=image_collator())
    shared = (args_dir, seed, rec["steps"], rec["bf16"], rec["batch_size"], lr)
    if extra is None:
        return Trainer(model, recipe_args(TrainingArguments, *shared), **common)
    if "baseline" in extra:
        widths = list(zip(model.config.hidden_sizes, parent.config.hidden_sizes))
        return BaselineTrainer(model, recipe_args(TrainingArguments, *shared), parent_model=copy.deepcopy(parent),
                               pairs=[f"{s}={s}" for s in STAGES], widths=widths, clip_projections=True,
                               **extra["baseline"], **common)
    args = recipe_args(HKTTrainingArguments, *shared, **extra)
    return HKTTrainer(model, args, parent_model=copy.deepcopy(parent), **common)


def train(trainer: Trainer, bf16: bool) -> float:
    """Seconds of `trainer.train()`. Autocast is also opened here because accelerate only wraps the prepared
    child's forward: without it the parent's pass (and the head replay) of HKTTrainer would run in fp32."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        trainer.train()
    return time.perf_counter() - start


def final_logs(trainer: Trainer) -> dict[str, float]:
    """The last training log (loss, HKT loss parts and gate statistics) and the train summary."""
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "loss" in h), {})
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {k: v for k, v in {**last, **summary}.items() if isinstance(v, (int, float))}


def adapted_parent(rec: dict[str, Any], data, cache: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The pretrained ResNet-56 fine-tuned on the JPEG training split with the shared recipe (seed 0), cached."""
    key = f"parent-resnet56-jpeg-{rec['parent_steps']}steps-{rec['train_rows'] or 'all'}rows-b{rec['batch_size']}"
    folder = cache / key
    info_path = folder / "adaptation.json"
    if not info_path.exists():
        train_ds, test_ds = data
        model = prepare(load_pretrained("resnet56"), rec["bf16"])
        trainer = Trainer(model, recipe_args(TrainingArguments, cache / "tmp-parent", 0, rec["parent_steps"],
                                             rec["bf16"], rec["batch_size"]),
                          train_dataset=train_ds, data_collator=image_collator())
        seconds = train(trainer, rec["bf16"])
        model = trainer.model.eval()
        model.save_pretrained(folder)
        info = {"steps": rec["parent_steps"], "train_s": seconds, "test_accuracy": evaluate(model, test_ds),
                "logs": final_logs(trainer), "init": CHECKPOINTS["resnet56"]}
        atomic_write_json(info_path, info)
    info = json.loads(info_path.read_text())
    parent = prepare(AutoModelForImageClassification.from_pretrained(folder), rec["bf16"]).eval()
    return parent, info


def evaluate(model: torch.nn.Module, test_ds) -> float:
    """Final top-1 accuracy in fp32 (the deployed child), on the test split."""
    return top1_accuracy(model.float().eval(), test_ds, batch_size=500, progress=False)


def run_all(opts: argparse.Namespace, argv: list[str]) -> Path:
    settings = dict(QUICK if opts.quick else FULL)
    if opts.steps:
        settings["steps"] = opts.steps
    rec = recipe(settings, bf16=opts.bf16)
    out: Path = opts.out or (opts.cache / "quick-results" if opts.quick else RESULTS)
    log = RunLog.open(out / LOG_NAME, rec)
    finish = log.start_command("benchmarks/cifar10.py", argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cache: Path = opts.cache
    train_images, train_labels = decoded_split("train", rec["train_rows"], cache)
    test_images, test_labels = decoded_split("test", rec["test_rows"], cache)
    data = (CifarTensors(train_images, train_labels, train=True), CifarTensors(test_images, test_labels, train=False))

    if "pretrained-child" not in log.reference:
        log.set_reference("pretrained-child", evaluate(load_pretrained("resnet20"), data[1]))
        log.set_reference("pretrained-parent", evaluate(load_pretrained("resnet56"), data[1]))
    parent, parent_info = adapted_parent(rec, data, cache)
    log.set_reference("adapted-parent", parent_info)


    def run(method: str, seed: int) -> dict[str, Any]:
        folder = cache / "runs" / out.name / method / f"seed{seed}"
        record = run_one(method, seed, rec, data, parent, folder)
        if "lineage" in record:  # the parent was loaded from its cached folder: an absolute path
            record["lineage"]["hkt_parent"] = log.relative(record["lineage"]["hkt_parent"])
        return {**record, "folder": log.relative(folder)}

    run_missing(log, opts.seeds, opts.methods, run)
    finish()
    report(out)
    return log.path


def run_one(method: str, seed: int, rec: dict[str, Any], data, parent, folder: Path, lr: float = LR,
            validation=None) -> dict[str, Any]:
    """Train and score one child (on `validation` too when given); its folder gets the child, its lineage and the
    card of the package's trainer."""
    child = prepare(load_pretrained("resnet20"), rec["bf16"])
    trainer = trainer_for(method, child, folder, seed, rec, data[0], parent, lr)
    seconds = train(trainer, rec["bf16"])
    scores = {} if validation is None else {"validation_accuracy": evaluate(trainer.model, validation)}
    accuracy = evaluate(trainer.model, data[1])
    trainer.save_model()
    trainer.create_model_card(model_name=f"resnet20-cifar10-jpeg-{method}", dataset="cifar10 (JPEG re-encode)",
                              tags=["image-classification", "cifar10"])
    record = {"method": method, "seed": seed, "settings": METHODS[method], "test_accuracy": accuracy, **scores,
              "train_s": seconds, "logs": final_logs(trainer)}
    if isinstance(trainer, HKTTrainer):
        record["lineage"] = load_lineage(folder)
    return record


# ---- report ---------------------------------------------------------------------------------------------------


def summarise(log: RunLog) -> dict[str, dict[str, Any]]:
    """Per method: seeds, accuracies (`values`), mean and sample std, mean train seconds."""
    return by_method(log.runs.values(), "test_accuracy", METHODS)


def markdown_table(log: RunLog) -> str:
    rec, ref = log.recipe, log.reference
    lines = [
        "| method | seeds | final test top-1 % (mean +- std) | per seed | train s / run |",
        "|---|---|---|---|---|",
    ]
    for method, row in summarise(log).items():
        per_seed = ", ".join(f"{a:.2f}" for _, a in sorted(zip(row["seeds"], row["values"])))
        lines.append(f"| {DESCRIPTIONS[method]} | {len(row['values'])} | {row['mean']:.2f} +- {row['std']:.2f} | "
                     f"{per_seed} | {row['mean_train_s']:.0f} |")
    lines += ["", "| reference model (not trained here) | test top-1 % |", "|---|---|"]
    if "pretrained-child" in ref:
        lines.append(f"| pretrained ResNet-20 ({CHECKPOINTS['resnet20']}) | {ref['pretrained-child']:.2f} |")
        lines.append(f"| pretrained ResNet-56 ({CHECKPOINTS['resnet56']}) | {ref['pretrained-parent']:.2f} |")
    if "adapted-parent" in ref:
        lines.append(f"| parent: ResNet-56 adapted to the JPEG train split, {ref['adapted-parent']['steps']} steps "
                     f"| {ref['adapted-parent']['test_accuracy']:.2f} |")
    lines += ["", recipe_line(rec), "", commands_line(log.commands.values()), *notes_lines(log.runs)]
    return "\n".join(lines)


def recipe_line(rec: dict[str, Any]) -> str:
    rows = rec["train_rows"] or "all 50,000"
    test = rec["test_rows"] or "all 10,000"
    return (f"Recipe: {rec['steps']} optimizer steps per child run (batch {rec['batch_size']}, {rows} training "
            f"images), "
            f"SGD lr {rec['lr']} momentum {rec['momentum']} weight decay {rec['weight_decay']}, {rec['schedule']}, "
            f"{rec['augmentation']}, {rec['normalisation']}, {'bf16 autocast' if rec['bf16'] else 'fp32'} training; "
            f"final accuracy in fp32 on {test} test images, measured once after the last step.")


def plot(log: RunLog, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = summarise(log)
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(rows)
    for i, name in enumerate(names):
        row = rows[name]
        ax.bar(i, row["mean"], yerr=row["std"], capsize=4, color="#4C72B0" if name.startswith("hkt") else "#999999")
        ax.scatter([i] * len(row["values"]), row["values"], color="black", s=10, zorder=3)
    ref = log.reference
    for label, value, style in (("pretrained ResNet-20", ref.get("pretrained-child"), ":"),
                                ("adapted parent", ref.get("adapted-parent", {}).get("test_accuracy"), "--")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="#C44E52", label=f"{label} ({value:.2f})")
    ax.set_xticks(range(len(names)), [f"{n}\n(n={len(rows[n]['values'])})" for n in names])
    accs = [a for r in rows.values() for a in r["values"]] + [v for v in (ref.get("pretrained-child"),) if v]
    if accs:
        ax.set_ylim(math.floor(min(accs)) - 1, math.ceil(max(accs)) + 1)
    ax.set_ylabel("final test top-1 % (JPEG CIFAR-10)")
    ax.set_title(f"ResNet-20 child, ResNet-56 parent, {log.recipe['steps']} steps per run")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_card(log: RunLog) -> str | None:
    """The card of the best HKT method by mean final test accuracy (so the variant was chosen on test numbers, which
    the card states), rendered by the package's `render_model_card` from the lineage its runs logged; None before
    such a run has finished."""
    rows = summarise(log)
    hkt = {m: r for m, r in rows.items() if m.startswith("hkt")}
    best = max(hkt, key=lambda m: hkt[m]["mean"], default=None)
    lineage = next((run["lineage"] for _, run in sorted(log.runs.items())
                    if run["method"] == best and "lineage" in run), None)
    if lineage is None:
        return None
    row, ref = hkt[best], log.reference
    card = render_model_card(
        lineage, MODEL_CARD.stem, auto_class="AutoModelForImageClassification", task="image-classification",
        dataset="cifar10", child_metrics={"accuracy": round(row["mean"], 2)},
        parent_metrics=({"accuracy": round(ref["adapted-parent"]["test_accuracy"], 2)}
                        if "adapted-parent" in ref else None),
        training_recipe={"recipe": recipe_line(log.recipe), "child initialisation": CHECKPOINTS["resnet20"],
                         "parent": f"{CHECKPOINTS['resnet56']} adapted to the JPEG training split "
                                   f"({log.recipe['parent_steps']} steps, seed 0), then frozen"},
        tags=["image-classification", "cifar10"],
    )
    def baseline(m: str) -> str:
        row = rows.get(m)
        return f"{row['mean']:.2f} +- {row['std']:.2f} ({len(row['values'])} seeds)" if row else "not run yet"

    return card.content.rstrip() + f"""

## Against the baselines of the same benchmark

<!-- Generated by `python benchmarks/cifar10.py --report` from benchmarks/results/{LOG_NAME}: do not edit. -->

Method: {DESCRIPTIONS[best]}, the best HKT variant of `benchmarks/cifar10.py` by mean final test accuracy (so the
variant, though not any checkpoint or epoch, was chosen on the test set). Numbers are for this JPEG re-encode of
CIFAR-10 only; they are not comparable with results on the original data.

| model (final test top-1 %, mean +- std over seeds) | accuracy |
|---|---|
| this recipe, {best} | {baseline(best)} |
| same recipe, child alone | {baseline('child')} |
| same recipe, KD (T = 4) | {baseline('kd')} |
| pretrained ResNet-20, before training | {ref.get('pretrained-child', float('nan')):.2f} |

Reproduce with `python benchmarks/cifar10.py` (see benchmarks/README.md).
"""


def report(out: Path) -> None:
    """Table, plot and model card from `<out>/cifar10.jsonl`; the card goes to model_cards/ only for the committed
    results folder, into `out` otherwise."""
    log = RunLog.read(out / LOG_NAME)
    write_report(out, "cifar10", "CIFAR-10 (JPEG) final test accuracy", markdown_table(log), lambda p: plot(log, p))
    card = model_card(log)
    if card is not None:
        target = MODEL_CARD if out.resolve() == RESULTS.resolve() else out / MODEL_CARD.name
        target.write_text(card)
    else:
        print("No model card written: no HKT run with a logged lineage yet.")
    print(markdown_table(log))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], METHODS, ["child", "kd", "hkt"], CACHE,
                              "a few steps on subsets: a CI smoke run")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast + channels-last (faster, but lost accuracy in a check; part of the recipe)")
    return run_or_report(parser.parse_args(argv), argv, run_all, report)


if __name__ == "__main__":
    raise SystemExit(main())
