"""The step-cost machinery both step-cost scripts use: trainer steps, warm-up and interleaved timing, paired ratios
with their spread, saved-for-backward memory, a per-phase breakdown and the report output.

A ratio is taken round by round: in each round every method runs once on the same batch (odd rounds in reverse
order), so the ratio of two methods in one round compares steps made seconds apart under the same load. The headline
is the median of those per-round ratios, and its spread the range of the middle half of them (quartiles) and of all
of them. Every mode of a script times the same shapes after the same warm-up; `--quick` only runs fewer rounds, so
its ratios estimate the same quantities as the full run's, with a wider spread.
"""

from __future__ import annotations

import argparse
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

import torch
from harness import atomic_write_json, atomic_write_text, provenance, relative_argv
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers import Trainer

# Untimed interleaved rounds before any measurement, in every mode: the first steps of a method pay for lazy
# optimizer states, allocator growth and oneDNN kernel selection, which a short run would otherwise time.
WARMUP_ROUNDS = 2

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


Batch = dict[str, torch.Tensor]
Step = Callable[[Batch], None]
MIB = 2.0**20
_STARTED = time.perf_counter()
_LOAD_AT_START = os.getloadavg()[0]


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


def warm_up(steps: dict[str, Step], batches: list[Batch]) -> None:
    """`WARMUP_ROUNDS` untimed interleaved rounds of every step."""
    measure(steps, batches, WARMUP_ROUNDS)


def paired_ratios(times: dict[str, list[float]], name: str, peer: str) -> list[float]:
    """`name`'s step time over `peer`'s, round by round (`measure` runs both once per round)."""
    return [t / p for t, p in zip(times[name], times[peer])]


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, extremes and count of `values` (per-round ratios): what a reader needs to judge a ratio."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "rounds": len(values)}


def spread_text(s: dict[str, float]) -> str:
    return (f"{s['median']:.2f} (middle half {s['q1']:.2f}-{s['q3']:.2f}, all {s['min']:.2f}-{s['max']:.2f}, "
            f"{s['rounds']} rounds)")


def ratio_results(times: dict[str, list[float]], keys: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """For each `key: (method, against)`, the median per-round ratio as `key` and its spread as `spread[key]`;
    None for a method that was not measured."""
    result: dict[str, Any] = {"spread": {}}
    for key, (name, against) in keys.items():
        if name in times and against in times:
            result["spread"][key] = spread(paired_ratios(times, name, against))
            result[key] = result["spread"][key]["median"]
        else:
            result[key] = None
    return result


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
) -> dict[str, dict[str, Any]] | None:
    """Per method, mean seconds per step of each phase and forward calls per step (a separate, hooked pass: the hooks
    cost a little, so these are for the shares, not for the headline times). None with `repeats` 0."""
    if repeats == 0:
        return None
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


def targets_section(result: dict[str, Any], targets: dict[str, float], rest: str) -> list[str]:
    """Report lines on the missed targets, with the phase breakdown (`rest` says what its last column holds), or
    none when every target is met."""
    missed = missed_targets(result, targets)
    if not missed:
        return []
    lines = ["", "Targets missed: " + "; ".join(missed) + "."]
    if result["phases"] is None:
        return lines + ["", "The full run breaks each step into phases."]
    return lines + ["", f"Where each step's time goes (seconds per step, share; {rest}):", "",
                    breakdown_table(result["phases"])]


def step_cost_parser(description: str, quick_help: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options both step-cost scripts have: the mode (full by default, `--quick` or `--smoke`), threads, output."""
    parser = argparse.ArgumentParser(description=description)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help=quick_help)
    modes.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result to this .json file and its table to the same name with .md")
    return parser


def mode_of(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def emit(result: dict[str, Any], script: str, title: str, markdown: str, out: Path | None,
         argv: list[str] | None) -> None:
    """Print the tables, write `out` (JSON) and its `.md` if asked, and print the result as the LAST line (one JSON
    object), which is what the tests and the lead's scripts read. The result records the command (paths relative)
    and the commit it ran at."""
    argv = list(argv if argv is not None else sys.argv[1:])
    result["command"] = shlex.join(["python", f"benchmarks/{script}", *relative_argv(argv)])
    result.update(provenance())
    # The ratios mean something only on a quiet machine: the 1-minute load average says how quiet it was.
    result["load_average"] = {"at_start": _LOAD_AT_START, "at_end": os.getloadavg()[0], "cpus": os.cpu_count()}
    load = result["load_average"]
    markdown = (f"Load average (1 min) {load['at_start']:.1f} at the start, {load['at_end']:.1f} at the end, on "
                f"{load['cpus']} CPUs.\n\n{markdown}")
    print(markdown)
    if out is not None:
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), f"# {title}\n\n`{result['command']}`\n\n{markdown}\n")
    print(json.dumps(result, sort_keys=True))
