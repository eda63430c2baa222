"""Shared pieces of the benchmarks: where the shared data and checkpoints live, a uint8 decode cache, a tensor
dataset with the package's augmentation, the reference training recipe, the fast CPU setup, and the step-cost
machinery both step-cost scripts use (trainer steps, interleaved timing, saved-for-backward memory, a per-phase
breakdown, the report output).

Benchmarks may read ../shared (the package never does). JPEG decoding is done once per split and cached under
benchmarks/.cache/ (gitignored); each training step then only crops, flips and normalises uint8 arrays.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import Dataset

from transformers import Trainer

from hkt_hf.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint
from hkt_hf.data.images import load_image_dataset, random_crop_flip, strided_subset, to_rgb_array
from hkt_hf.models import IMAGENET_MEAN, IMAGENET_STD, CifarResNetForImageClassification

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
MODELS_DIR = SHARED / "models" / "cifar-resnet"
CACHE = REPO / "benchmarks" / ".cache"
RESULTS = REPO / "benchmarks" / "results"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}

# The reference CIFAR recipe (method doc): SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128,
# random crop with 4 pixels of zero padding + horizontal flip, ImageNet mean/std.
LR, MOMENTUM, WEIGHT_DECAY, BATCH_SIZE, PADDING = 0.01, 0.9, 1e-4, 128, 4

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the benchmarks need the shared CIFAR-10 data and checkpoints beside the repository "
            f"(expected in {SHARED})."
        )
    return path


def load_pretrained(name: str) -> CifarResNetForImageClassification:
    """A reference checkpoint ('resnet20' or 'resnet56') as a transformers model, in eval mode."""
    return import_checkpoint(require(MODELS_DIR / CHECKPOINTS[name]))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_results(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """A benchmark's results file (recipe, finished runs, reference models, commands), or a new one; a file of
    another recipe is refused, so runs of different recipes never share a table."""
    if not path.exists():
        return {"recipe": rec, "runs": {}, "reference": {}, "commands": []}
    results = json.loads(path.read_text())
    if results["recipe"] != rec:
        raise SystemExit(
            f"{path} holds runs of another recipe:\n  stored:    {results['recipe']}\n  requested: {rec}\n"
            "Resume with the same options, or pass --out to a new folder."
        )
    return results


def commands_line(commands: list[dict[str, Any]]) -> str:
    """The Markdown line listing a benchmark's invocations with their wall time, and the total of the finished ones."""
    finished = sum(c.get("wall_s", 0.0) for c in commands)
    return "Commands: " + "; ".join(
        f"`{c['argv']}` ({c['started']}, "
        + (f"{c['wall_s'] / 60:.1f} min" if "wall_s" in c else "not finished: running or interrupted") + ")"
        for c in commands
    ) + f". Wall time of the finished invocations: {finished / 60:.1f} min."


def decoded_split(split: str, rows: int | None = None, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] uint8 and labels [N] of a shared CIFAR-10 split (a strided subset of `rows`), decoded
    from JPEG once and cached as .npz."""
    path = cache / f"cifar10-{split}-{rows or 'all'}.npz"
    if not path.exists():
        ds = load_image_dataset(str(require(CIFAR_DIR / f"{split}.parquet")))[split]
        ds = strided_subset(ds, rows)
        images = np.stack([to_rgb_array(img) for img in ds["img"]])
        labels = np.asarray(ds["label"], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    with np.load(path) as blob:
        return blob["images"], blob["labels"]


def normalise(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float, rescaled to [0, 1] and normalised with ImageNet mean/std, exactly as
    `hkt_hf.models.cifar_image_processor()` does (checked in tests/test_benchmarks.py)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    return (x - _MEAN) / _STD


class CifarTensors(Dataset):
    """Decoded CIFAR images as `{"pixel_values", "labels"}` rows; `train=True` applies `random_crop_flip`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"Need as many images as labels, and at least one: got {len(images)} and {len(labels)}.")
        self.images, self.labels, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i]
        if self.train:
            image = random_crop_flip(image, PADDING)
        return {"pixel_values": normalise(image), "labels": int(self.labels[i])}


def prepare(model: nn.Module, bf16: bool) -> nn.Module:
    """Channels-last weights for bf16 autocast (oneDNN's bf16 convolutions are several times faster so on this CPU);
    fp32 models stay as they are (channels-last was slower in fp32)."""
    return model.to(memory_format=torch.channels_last) if bf16 else model


def recipe_args(
    args_class: type, output_dir: Path | str, seed: int, max_steps: int, bf16: bool, batch_size: int = BATCH_SIZE,
    **extra: Any,
):
    """Training arguments of the shared recipe for `args_class` (TrainingArguments or HKTTrainingArguments)."""
    return args_class(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=bf16,
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=LR,
        optim="sgd",
        optim_args=f"momentum={MOMENTUM}",
        weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(1, min(50, max_steps // 4)),
        **extra,
    )


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def round_robin(names: list[str], repeats: int) -> Iterator[str]:
    """Each name once per round, `repeats` rounds, odd rounds in reverse order (A B, B A, ...): noise on a shared
    machine, and any advantage of running right after another method, hit every method alike."""
    for r in range(repeats):
        yield from (names if r % 2 == 0 else names[::-1])


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- step cost ------------------------------------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]
Step = Callable[[Batch], None]
MIB = 2.0**20
_STARTED = time.perf_counter()


def progress(message: str) -> None:
    """A timestamped stage line, flushed, so a long run on a busy machine shows where it is."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", flush=True)


def peer_missing(package: str, error: ImportError) -> SystemExit:
    """The exit raised when a comparison peer is not installed: peers are benchmark extras, never dependencies."""
    return SystemExit(f"{package} is needed for this benchmark ({error}); install the peers: pip install -e '.[bench]'")


def trainer_step(trainer: Trainer) -> Step:
    """One optimizer step through `trainer.training_step` (the path `Trainer.train` runs) with the trainer's own
    optimizer (an HKTTrainer's holds its adapter, built with the trainer). Each call gets a copy of the batch: some
    trainers pop or add keys."""
    trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop, read by `training_step`
    optimizer = trainer.create_optimizer()

    def step(batch: Batch) -> None:
        trainer.training_step(trainer.model, dict(batch), None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rows_of(batch: Batch, count: int | None = None) -> list[Batch]:
    """The examples of a collated batch, cycled to `count` rows, as a training set (an HKTTrainer builds its adapter
    from its first training batch, so the set must fill one)."""
    size = len(next(iter(batch.values())))
    return [{key: value[i % size] for key, value in batch.items()} for i in range(count or size)]


def parameter_storages(*models: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for model in models for p in model.parameters()}


def saved_for_backward(step: Step, batch: Batch, params: set[int], last_dim: int | None = None) -> tuple[int, int]:
    """Bytes of the distinct non-parameter storages autograd saves for backward during one step, and how many of
    those storages were saved as a tensor whose last dimension is `last_dim` (e.g. [batch, seq, vocab] logits)."""
    storages: dict[int, int] = {}
    wide: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
            if last_dim is not None and t.ndim >= 2 and t.shape[-1] == last_dim:
                wide.add(storage.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(storages.values()), len(wide)


def measure(steps: dict[str, Step], batches: list[Batch], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every step, interleaved round-robin, each round on the same batch for every method."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i, name in enumerate(round_robin(names, repeats)):
        batch = batches[(i // len(names)) % len(batches)]
        times[name].append(timed(lambda: steps[name](batch)))
    return times


class PhaseTimer:
    """Wall time spent inside the forward of named modules, outermost call only, plus the optimizer step.

    `phases` maps a phase name to modules (e.g. "parent forward": [parent]); a module called inside another timed
    module's forward counts for the outer one, so a head counts as "head replay" only when called on its own. What is
    left of the step (backward, loss terms, gates, aligners, Python) is reported as the rest by `phase_breakdown`.
    """

    def __init__(self, phases: dict[str, list[nn.Module]]):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._active: tuple[str, nn.Module, float] | None = None
        self._optimizer_depth, self._optimizer_start = 0, 0.0
        self._handles = []
        for phase, modules in phases.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(phase)))
                self._handles.append(module.register_forward_hook(self._leave(phase), always_call=True))
        self._handles.append(register_optimizer_step_pre_hook(self._optimizer_enter))
        self._handles.append(register_optimizer_step_post_hook(self._optimizer_leave))

    def _enter(self, phase: str) -> Callable[..., None]:
        def hook(module: nn.Module, *_: Any) -> None:
            if self._active is None:
                self._active = (phase, module, time.perf_counter())

        return hook

    def _leave(self, phase: str) -> Callable[..., None]:
        def hook(module: nn.Module, *_: Any) -> None:
            if self._active is not None and self._active[:2] == (phase, module):
                self.seconds[phase] += time.perf_counter() - self._active[2]
                self.calls[phase] += 1
                self._active = None

        return hook

    def _optimizer_enter(self, *_: Any) -> None:
        # An optimizer may wrap another (Accelerate's AcceleratedOptimizer): time the outermost step only.
        self._optimizer_depth += 1
        if self._optimizer_depth == 1:
            self._optimizer_start = time.perf_counter()

    def _optimizer_leave(self, *_: Any) -> None:
        self._optimizer_depth -= 1
        if self._optimizer_depth == 0:
            self.seconds["optimizer step"] += time.perf_counter() - self._optimizer_start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


REST = "backward, loss terms, gates, rest"
PHASE_ORDER = ("parent forward", "child forward", "head replay", "optimizer step", REST)


def phase_breakdown(
    steps: dict[str, Step], phases: dict[str, dict[str, list[nn.Module]]], batches: list[Batch], repeats: int
) -> dict[str, dict[str, Any]]:
    """Per method, mean seconds per step of each phase and forward calls per step (a separate, hooked pass: the hooks
    cost a little, so these are for the shares, not for the headline times)."""
    result = {}
    for name, step in steps.items():
        timer = PhaseTimer(phases[name])
        try:
            total = sum(timed(lambda: step(batches[r % len(batches)])) for r in range(repeats))
        finally:
            timer.close()
        seconds = {phase: s / repeats for phase, s in timer.seconds.items()}
        seconds[REST] = total / repeats - sum(seconds.values())
        result[name] = {"total_s": total / repeats, "seconds": seconds,
                        "calls_per_step": {phase: n / repeats for phase, n in timer.calls.items()}}
    return result


def breakdown_table(breakdown: dict[str, dict[str, Any]]) -> str:
    seen = {p for b in breakdown.values() for p in b["seconds"]}
    phases = [p for p in PHASE_ORDER if p in seen] + sorted(seen - set(PHASE_ORDER))
    rows = ["| method | step (s) | " + " | ".join(phases) + " |", "|---|---|" + "---|" * len(phases)]
    for name, b in breakdown.items():
        cells = []
        for phase in phases:
            s, calls = b["seconds"].get(phase, 0.0), b["calls_per_step"].get(phase)
            cells.append(f"{s:.3f} ({s / b['total_s']:.0%})" + (f", {calls:g} call(s)" if calls else ""))
        rows.append(f"| {name} | {b['total_s']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def missed_targets(result: dict[str, Any], targets: dict[str, float]) -> list[str]:
    """The `key <= bound` targets that `result` misses, as readable lines."""
    return [f"`{key}` = {result[key]:.3f} > {bound}" for key, bound in targets.items()
            if isinstance(result.get(key), float) and result[key] > bound]


def emit(result: dict[str, Any], script: str, title: str, markdown: str, out: Path | None,
         argv: list[str] | None) -> None:
    """Print the tables, write `out` (JSON) and its `.md` if asked, and print the result as the LAST line (one JSON
    object), which is what the tests and the lead's scripts read."""
    result["command"] = shlex.join(["python", f"benchmarks/{script}", *(argv if argv is not None else sys.argv[1:])])
    print(markdown)
    if out is not None:
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), f"# {title}\n\n`{result['command']}`\n\n{markdown}\n")
    print(json.dumps(result, sort_keys=True))
