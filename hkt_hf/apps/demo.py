"""`hkt-hf demo`: the whole HKT story on real data in about a minute on a laptop CPU, with no internet.

Four runs under one recipe and one seed: a parent, a child alone, the child with classic knowledge distillation
(KD: native cross-entropy + KD term, no HKT terms) and the child with HKT. The default task is scikit-learn's
bundled handwritten digits (1,797 grey 8x8 images, a fixed stratified split), so nothing is downloaded. Any image
classification dataset with image and label columns works too (`DemoTask.from_image_dataset`).

The result is a table (test top-1 of each run, parameter counts, HKT's mean gate and mixing weight) and a PNG with
accuracy bars and training-loss curves. The table reports what happened: if HKT does not beat the child alone, it
shows that.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from hkt_hf.trainer import HKTTrainer
from hkt_hf.training_args import HKTTrainingArguments

from .data.images import image_collator
from .metrics import top1_accuracy
from .models import CifarResNetConfig, CifarResNetForImageClassification

RUNS = ("parent", "child alone", "KD", "HKT")
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclass
class DemoTask:
    """What the demo trains on: prepared splits (yielding `pixel_values` and `labels`) and model builders.

    `make_parent(seed)` builds an untrained parent that the demo trains first; a `parent` model instead is used as
    it is (already trained). `make_child(seed)` builds the starting child of each of the three child runs.
    """

    name: str
    train: Any
    test: Any
    make_child: Callable[[int], nn.Module]
    make_parent: Callable[[int], nn.Module] | None = None
    parent: nn.Module | None = None

    def __post_init__(self) -> None:
        if (self.make_parent is None) == (self.parent is None):
            raise ValueError("A DemoTask needs exactly one of make_parent (train a parent) or parent (use a trained one).")


@dataclass
class DemoRecipe:
    """The one recipe every run shares (Adam-type optimiser: reaches a plateau in a few epochs on small data)."""

    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "cosine"


@dataclass
class RunResult:
    name: str
    seed: int
    accuracy: float
    parameters: int
    seconds: float
    loss_curve: list[tuple[int, float]]  # (step, child cross-entropy on the labels)
    gate_mean: float | None = None
    mix_weight_mean: float | None = None


@dataclass
class DemoReport:
    task: str
    recipe: DemoRecipe
    seeds: list[int]
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def by_name(self, name: str) -> list[RunResult]:
        return [r for r in self.runs if r.name == name]


def cifar_resnet(depth: int, widths: Sequence[int], num_labels: int, num_channels: int, seed: int,
                 id2label: dict[int, str] | None = None) -> CifarResNetForImageClassification:
    """A freshly initialised built-in CIFAR ResNet (works on any image size: the pooling is global)."""
    torch.manual_seed(seed)
    config = CifarResNetConfig(depth=depth, hidden_sizes=list(widths), num_channels=num_channels,
                               num_labels=num_labels, id2label=id2label or {i: str(i) for i in range(num_labels)})
    return CifarResNetForImageClassification(config)


def digits_task(test_fraction: float = DIGITS_TEST_FRACTION, split_seed: int = DIGITS_SPLIT_SEED) -> DemoTask:
    """scikit-learn's bundled digits, split once with a fixed seed (stratified); parent ResNet-14 (widths 16/32/64),
    child ResNet-8 (widths 4/8/16)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "The digits demo needs scikit-learn (it ships the data): pip install 'hkt-hf[demo]'."
        ) from err
    digits = load_digits()
    # 0..16 grey levels -> [-1, 1], one channel.
    pixels = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x_train, x_test, y_train, y_test = train_test_split(
        pixels[:, None], digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )

    def split(x: np.ndarray, y: np.ndarray) -> Dataset:
        return Dataset.from_dict({"pixel_values": x, "labels": y.astype(np.int64)}).with_format("torch")

    labels = {i: str(i) for i in range(10)}
    return DemoTask(
        name=f"scikit-learn digits (8x8 grey, {len(y_train)} train / {len(y_test)} test)",
        train=split(x_train, y_train),
        test=split(x_test, y_test),
        make_parent=lambda seed: cifar_resnet(14, (16, 32, 64), 10, 1, seed, labels),
        make_child=lambda seed: cifar_resnet(8, (4, 8, 16), 10, 1, seed, labels),
    )


class StepBar(TrainerCallback):
    """One quiet progress bar per run (Trainer's own would print every log dict)."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, leave=False, disable=not self.enabled)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def training_arguments(output_dir: Path, recipe: DemoRecipe, seed: int, steps_per_epoch: int,
                       **hkt: Any) -> HKTTrainingArguments:
    return HKTTrainingArguments(
        output_dir=str(output_dir), seed=seed, num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay, optim=recipe.optim, lr_scheduler_type=recipe.lr_scheduler_type,
        logging_steps=max(1, steps_per_epoch // 2), save_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **hkt,
    )


def train_one(name: str, model: nn.Module, task: DemoTask, recipe: DemoRecipe, seed: int, work_dir: Path,
              parent: nn.Module | None = None, progress: bool = True, **hkt: Any) -> tuple[RunResult, nn.Module]:
    """Train `model` (with `HKTTrainer` when a parent is given), then measure its top-1 on the test split."""
    steps_per_epoch = math.ceil(len(task.train) / recipe.batch_size)
    args = training_arguments(work_dir / f"{name.replace(' ', '-')}-{seed}", recipe, seed, steps_per_epoch, **hkt)
    common = dict(args=args, train_dataset=task.train, data_collator=image_collator())
    trainer = (HKTTrainer(model, parent_model=parent, **common) if parent is not None else Trainer(model, **common))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepBar(f"{name} (seed {seed})", progress))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    loss_key = "hkt/loss_native" if parent is not None else "loss"
    curve = [(entry["step"], entry[loss_key]) for entry in history if loss_key in entry]
    gate = [entry[k] for entry in history for k in entry if k.endswith("/gate_mean")]
    mix = [entry[k] for entry in history for k in entry if k.endswith("/mix_weight_mean")]
    device = args.device
    accuracy = top1_accuracy(trainer.model, task.test, batch_size=256, device=device, progress=False)
    result = RunResult(name, seed, accuracy, trainer.model.num_parameters(), seconds, curve,
                       mean(gate) if gate else None, mean(mix) if mix else None)
    return result, trainer.model


def run_demo(task: DemoTask, output_dir: str | Path, seeds: Sequence[int] = (0, 1, 2),
             recipe: DemoRecipe | None = None, kd_temperature: float = 4.0, progress: bool = True,
             log: Callable[[str], None] = print) -> DemoReport:
    """Train the parent once (first seed) unless the task gives one, then child alone, KD and HKT for each seed.

    A seed fixes the child's initial weights and the data order, and is shared by the three child runs, so they
    differ only in their loss.
    """
    if not seeds:
        raise ValueError("Give at least one seed.")
    recipe = recipe or DemoRecipe()
    work = Path(output_dir) / "runs"
    report = DemoReport(task.name, recipe, list(seeds))
    start = time.perf_counter()
    if task.parent is not None:
        parent = task.parent
        device = training_arguments(work, recipe, seeds[0], 1).device
        accuracy = top1_accuracy(parent, task.test, batch_size=256, device=device, progress=False)
        report.runs.append(RunResult("parent", seeds[0], accuracy, parent.num_parameters(), 0.0, []))
    else:
        result, parent = train_one("parent", task.make_parent(seeds[0]), task, recipe, seeds[0], work,
                                   progress=progress)
        report.runs.append(result)
    log(run_line(report.runs[-1]))
    kd = dict(hkt_loss_weights=[1.0, 0.0, 0.0], hkt_kd_weight=1.0, hkt_kd_temperature=kd_temperature)
    for seed in seeds:
        for name, hkt in (("child alone", None), ("KD", kd), ("HKT", {})):
            result, _ = train_one(name, task.make_child(seed), task, recipe, seed, work,
                                  parent=parent if hkt is not None else None, progress=progress, **(hkt or {}))
            report.runs.append(result)
            log(run_line(result))
    report.seconds = time.perf_counter() - start
    return report


def run_line(result: RunResult) -> str:
    took = f" in {result.seconds:.1f} s" if result.seconds else " (given, not trained)"
    return f"  {result.name:<12} seed {result.seed}: test top-1 {result.accuracy:6.2f} %{took}"


def _summary(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def format_table(report: DemoReport) -> str:
    """The comparison table: test top-1 (mean ± std over seeds when several), parameters, HKT gate statistics."""
    n = len(report.seeds)
    top1 = f"test top-1 %, {n} seed{'s' if n > 1 else ''}" + (" (mean ± std)" if n > 1 else "")
    header = f"{'run':<12} | {top1:<34} | {'parameters':>10} | {'mean gate a':>14} | {'mean mixing weight':>18}"
    lines = [f"HKT demo on {report.task}", f"recipe: {report.recipe.epochs} epochs, batch {report.recipe.batch_size}, "
             f"{report.recipe.optim} lr {report.recipe.learning_rate:g}, {report.recipe.lr_scheduler_type} schedule, "
             f"child seeds {', '.join(map(str, report.seeds))} (initial weights and data order, shared by the three "
             f"child runs); parent trained once, seed {report.seeds[0]}", header, "-" * len(header)]
    for name in RUNS:
        runs = report.by_name(name)
        gate = [r.gate_mean for r in runs if r.gate_mean is not None] if name == "HKT" else []
        mix = [r.mix_weight_mean for r in runs if r.mix_weight_mean is not None] if name == "HKT" else []
        lines.append(
            f"{name:<12} | {_summary([r.accuracy for r in runs]):<34} | {runs[0].parameters:>10,} | "
            f"{_summary(gate, 3) if gate else '-':>14} | {_summary(mix, 3) if mix else '-':>18}"
        )
    alone, hkt, kd = (mean(r.accuracy for r in report.by_name(k)) for k in ("child alone", "HKT", "KD"))
    verdict = "beats" if hkt > alone else ("ties with" if hkt == alone else "does NOT beat")
    lines.append(f"HKT {verdict} the child alone by {hkt - alone:+.2f} points (KD: {kd - alone:+.2f}); "
                 "the deployed HKT and KD children have exactly the child's parameters.")
    lines.append(f"total time {report.seconds:.0f} s")
    return "\n".join(lines)


def plot_report(report: DemoReport, path: str | Path) -> Path:
    """Accuracy bars (mean over seeds, one dot per seed) and the child's training cross-entropy per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(RUNS, ("#555555", "#1f77b4", "#ff7f0e", "#2ca02c")))
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(RUNS):
        accuracies = [r.accuracy for r in report.by_name(name)]
        bars.bar(i, mean(accuracies), color=colours[name])
        bars.scatter([i] * len(accuracies), accuracies, color="black", s=10, zorder=3)
        bars.text(i, max(accuracies) + 0.3, f"{mean(accuracies):.1f}", ha="center", va="bottom")
    low = min(r.accuracy for r in report.runs)
    bars.set_ylim(max(0.0, low - 10), 100)
    bars.set_xticks(range(len(RUNS)), RUNS)
    bars.set_ylabel("test top-1 (%)")
    bars.set_title(f"Test accuracy ({len(report.seeds)} seed{'s' if len(report.seeds) > 1 else ''})")
    for name in RUNS:
        for j, run in enumerate(report.by_name(name)):
            if run.loss_curve:
                steps, losses = zip(*run.loss_curve)
                curves.plot(steps, losses, color=colours[name], alpha=0.9, label=name if j == 0 else None)
    curves.set_yscale("log")
    curves.set_xlabel("training step")
    curves.set_ylabel("cross-entropy on the labels (train)")
    curves.set_title("Training loss (the child's own term for KD and HKT)")
    curves.legend()
    fig.suptitle(report.task)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
