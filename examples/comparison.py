"""What the dense-prediction examples share: a KD baseline trainer, a cached parent, gate statistics, per-method
summaries, and a run log that makes a long comparison resumable (each finished run is written at once, and a
re-run with the same settings skips the runs already logged).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer

from hkt_hf.losses import kd_loss
from hkt_hf.objective import model_inputs, prediction


class KDTrainer(Trainer):
    """The KD baseline: the child's task loss plus a classic distillation term from the frozen parent (training
    only). `kind` is `hkt_hf`'s KD loss: 'kl' on logits (per pixel for dense logits), 'l1' / 'mse' on regressions."""

    def __init__(self, *args: Any, teacher: torch.nn.Module, kd_weight: float, temperature: float = 1.0,
                 kind: str = "kl", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.kd_weight, self.temperature, self.kind = kd_weight, temperature, kind

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            with torch.no_grad():
                target = prediction(self.teacher(**model_inputs(inputs)))
            loss = loss + self.kd_weight * kd_loss(prediction(outputs), target, self.temperature, self.kind)
        return (loss, outputs) if return_outputs else loss


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_parent(output_dir: str | Path, settings: dict[str, Any], model_class: type[PreTrainedModel],
                  build: Callable[[], PreTrainedModel], train: Callable[[PreTrainedModel, Path], None]
                  ) -> PreTrainedModel:
    """Train the parent once (`train(model, run_dir)`); later runs with the same `settings` load it from the cache.
    The cache entry appears only once complete (saved to a temporary folder, then renamed)."""
    path = Path(output_dir) / f"parent-{settings_key(settings)}"
    if (path / "config.json").is_file():
        print(f"Loading the cached parent from {path}", file=sys.stderr)
        return model_class.from_pretrained(path)
    parent = build()
    train(parent, path.with_name(path.name + "-run"))
    tmp = path.with_name(path.name + ".tmp")
    parent.save_pretrained(tmp)
    os.replace(tmp, path)
    return parent


def last_gate_logs(trainer: Trainer) -> dict[str, float]:
    """The gate statistics of the last training log (mean gate a and mixing weight per carrier)."""
    logs = [log for log in trainer.state.log_history if any(k.startswith("hkt/") for k in log)]
    return {k: round(v, 4) for k, v in logs[-1].items() if k.endswith(("gate_mean", "mix_weight_mean"))} if logs else {}


def summarize(runs: list[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Mean and spread of `metric` per method over the seeds."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        values = [r[metric] for r in runs if r["method"] == method]
        summary[method] = {metric: round(statistics.mean(values), 3),
                           "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0, "seeds": len(values)}
    return summary


class RunLog:
    """Finished runs of one comparison, kept in `path` (JSON) and rewritten atomically after each run. A log
    written under other settings is set aside as `<name>.stale.json`, never mixed in."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path, self.settings = Path(path), json.loads(json.dumps(settings, default=str))
        self.runs: list[dict[str, Any]] = []
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("settings") == self.settings:
                self.runs = saved["runs"]
            else:
                os.replace(self.path, self.path.with_suffix(".stale.json"))

    def find(self, method: str, seed: int) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["method"] == method and r["seed"] == seed), None)

    def add(self, result: dict[str, Any]) -> None:
        self.runs.append(result)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "runs": self.runs}, indent=2) + "\n")
        os.replace(tmp, self.path)


def run_all(args: Any, methods: list[str], run: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (seed, method) run of `args.seeds` in order, taking finished ones from `<args.output_dir>/runs.json` and
    logging new ones as they end. The log holds runs of the same settings: `args` less output paths and selection."""
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "seeds", "methods", "output_dir")}
    log = RunLog(Path(args.output_dir) / "runs.json", settings)
    runs = []
    for seed in args.seeds:
        for method in methods:
            result = log.find(method, seed)
            if result is None:
                result = run(method, seed)
                log.add(result)
                print(json.dumps(result), file=sys.stderr)
            else:
                print(f"{method} seed {seed}: taken from {log.path}", file=sys.stderr)
            runs.append(result)
    return runs


def write_result(script: str, argv: list[str] | None, args: Any, started: float, parent: PreTrainedModel,
                 parent_scores: dict[str, float], child: PreTrainedModel, runs: list[dict[str, Any]], metric: str,
                 **details: Any) -> dict[str, Any]:
    """Gather a comparison's result (command, `details`, parent, per-run and per-method `metric`), print it as one
    JSON line, write it to `args.json` if given, and return it."""
    result = {
        "command": f"python examples/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        **details,
        "parent": {**parent_scores, "params": parent.num_parameters()},
        "child_params": child.num_parameters(),
        "seeds": args.seeds, "summary": summarize(runs, metric), "runs": runs,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result
