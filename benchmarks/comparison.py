"""What the comparison scripts share (the dense-prediction examples: child alone, KD and HKT over seeds): the KD
baseline's arguments, a cached parent, gate statistics, the resumable run loop over `harness.RunLog` and the result
they print.

The KD baseline is the package's own: `HKTTrainer` with `hkt_loss_weights=[1, 0, 0]` and `hkt_kd_weight > 0` (the
child's task loss plus the KD term, no HKT term computed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import RunLog, by_method, provenance, relative, relative_argv, run_missing
from transformers import PreTrainedModel, Trainer


def kd_settings(weight: float, temperature: float = 1.0, loss: str = "kl") -> dict[str, Any]:
    """`HKTTrainingArguments` fields of the KD baseline: the task loss plus `weight` x the KD term, nothing else."""
    return dict(hkt_loss_weights=[1.0, 0.0, 0.0], hkt_kd_weight=weight, hkt_kd_temperature=temperature,
                hkt_kd_loss=loss)


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
    """Mean and spread of `metric` per method over the seeds, rounded for the printed result."""
    return {method: {metric: round(row["mean"], 3), "std": round(row["std"], 3), "seeds": len(row["values"])}
            for method, row in by_method(runs, metric).items()}


def run_all(args: Any, methods: list[str], run: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (seed, method) run of `args.seeds` in order, taking finished ones from `<args.output_dir>/runs.jsonl`
    and logging new ones as they end. The log holds runs of the same settings: `args` less output paths and
    selection (a log of other settings is refused)."""
    settings = {k: relative(v) if isinstance(v, str) and os.path.isabs(v) else v
                for k, v in vars(args).items() if k not in ("json", "seeds", "methods", "output_dir")}
    log = RunLog.open(Path(args.output_dir) / "runs.jsonl", settings)
    return run_missing(log, args.seeds, methods, run)


def comparison_parser(description: str, output_dir: str, quick_help: str, *, batch_size: int, lr: float,
                      logging_steps: int) -> argparse.ArgumentParser:
    """The options every comparison example has (its smoke mode, where runs go, the JSON result, the seeds, the
    data seed, the recipe's batch, rate and logging interval, the gate, the KD baseline's weight), with its own
    defaults for the recipe."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--output_dir", default=output_dir, help="Runs, the run log (runs.jsonl) and the cached parent.")
    p.add_argument("--json", help="Also write the final metrics to this JSON file.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Child seeds: initialisation and data order.")
    p.add_argument("--data_seed", type=int, default=1234, help="Seed of the generated data (evaluation: + 1).")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--logging_steps", type=int, default=logging_steps,
                   help="Steps between training logs (and gate statistics).")
    p.add_argument("--gate", default="genetic", help="HKT's gate.")
    p.add_argument("--kd_weight", type=float, default=1.0, help="Weight of the KD term of the 'kd' baseline.")
    return p


def parse_comparison_args(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any]
                          ) -> argparse.Namespace:
    """Parse; `--quick` replaces the options named in `quick` by its tiny values."""
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    return args


def write_result(script: str, argv: list[str] | None, args: Any, started: float, parent: PreTrainedModel,
                 parent_scores: dict[str, float], child: PreTrainedModel, runs: list[dict[str, Any]], metric: str,
                 **details: Any) -> dict[str, Any]:
    """Gather a comparison's result (command with relative paths, commit, `details`, parent, per-run and per-method
    `metric`), print it as one JSON line, write it to `args.json` if given, and return it."""
    argv = relative_argv(argv if argv is not None else sys.argv[1:])
    result = {
        "command": f"python examples/{script} " + " ".join(argv),
        **provenance(),
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
