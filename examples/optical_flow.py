"""HKT for optical flow: a RAFT parent teaches a RAFT-small child (torchvision's implementations) through
HKTTrainer, with two and with three carriers, as in the paper's flow experiments.

Compares, under one recipe (RAFT's sequence loss, AdamW, gradient clipping) and the same child initialisation per
seed: RAFT-small trained alone, with classic KD (L1 between its final flow and the parent's), and with HKT on
2 carriers (feature encoder and context encoder outputs, 1/8 resolution) and on 3 (plus the feature encoder's
1/4-resolution `layer2`). Reports the end-point error (EPE, pixels) of the child alone at evaluation.

Data: pairs with exactly known flow made from real CIFAR-10 images by known warps (`hkt_hf.apps.data.optical_flow`: a mosaic
background and 1-2 elliptical objects, each moving by its own random similarity transform, FlyingChairs-style;
128x128, RAFT's minimum). Training pairs come from the train split, evaluation pairs from the test split, seeded
and reproducible. It is a synthetic motion of real photographs, not Sintel or KITTI. `--images` takes any image
dataset (Hub id or local parquet folder) as the source of the photographs.

The parent (RAFT, no pretrained weights offline) is first trained on the same task (cached under `--output_dir`,
keyed by its settings), then frozen. Finished child runs are logged in `<output_dir>/runs.jsonl` as they end; a
re-run with the same settings skips them.

    python examples/optical_flow.py --quick                  # CI smoke run, about 1 minute on 2 cores
    python examples/optical_flow.py --json benchmarks/results/optical_flow.json

The last line printed is one JSON object with every metric.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, set_seed

from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.apps.data.images import CIFAR10_HUB_ID, load_image_dataset
from hkt_hf.apps.data.optical_flow import KnownWarpFlow
from hkt_hf.apps.metrics import evaluate_flow
from hkt_hf.apps.models import RaftConfig, RaftForOpticalFlow

# The comparison harness (resumable run log, KD baseline settings, cached parent) is the benchmarks' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from comparison import cached_parent, comparison_parser, kd_settings, last_gate_logs  # noqa: E402
from comparison import parse_comparison_args, run_all, write_result  # noqa: E402

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
CARRIERS = {
    "hkt-2": ["raft.feature_encoder=raft.feature_encoder", "raft.context_encoder=raft.context_encoder"],
    "hkt-3": ["raft.feature_encoder=raft.feature_encoder", "raft.context_encoder=raft.context_encoder",
              "raft.feature_encoder.layer2=raft.feature_encoder.layer2"],
}
METHODS = ["alone", "kd", *CARRIERS]
QUICK = dict(train_pairs=8, eval_pairs=4, parent_steps=2, steps=2, batch_size=2, iters=2, seeds=[0],
             logging_steps=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = comparison_parser(__doc__.split("\n\n")[0], "runs/optical_flow",
                          "Tiny smoke run (CI): few pairs, few steps, one seed.", batch_size=4, lr=4e-4,
                          logging_steps=25)
    p.add_argument("--images", help=f"Source photographs (default: shared CIFAR-10, else {CIFAR10_HUB_ID}).")
    p.add_argument("--size", type=int, default=128, help="Frame side in pixels (multiple of 8, >= 128).")
    p.add_argument("--train_pairs", type=int, default=4000)
    p.add_argument("--eval_pairs", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--iters", type=int, default=8, help="RAFT flow updates per forward, training and evaluation.")
    p.add_argument("--parent_steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=400, help="Optimiser steps of every child run.")
    return parse_comparison_args(p, argv, QUICK)


def load_data(args: argparse.Namespace) -> tuple[KnownWarpFlow, KnownWarpFlow]:
    source = args.images or (str(SHARED_CIFAR) if SHARED_CIFAR.is_dir() else CIFAR10_HUB_ID)
    images = load_image_dataset(source)
    return (KnownWarpFlow(images["train"], args.train_pairs, args.data_seed, size=args.size),
            KnownWarpFlow(images["test"], args.eval_pairs, args.data_seed + 1, size=args.size))


def build_model(variant: str, args: argparse.Namespace, seed: int) -> RaftForOpticalFlow:
    set_seed(seed)
    return RaftForOpticalFlow(RaftConfig(variant=variant, num_flow_updates=args.iters))


def training_kwargs(args: argparse.Namespace, output_dir: Path, steps: int, seed: int) -> dict[str, Any]:
    """RAFT's recipe, shortened: AdamW (lr 4e-4, weight decay 1e-4), 5 % warm-up then linear decay, clip 1.0."""
    return dict(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=1e-4, warmup_steps=max(1, steps // 20), lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=seed, save_strategy="no", report_to="none", logging_steps=args.logging_steps,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
    )


def train_parent(args: argparse.Namespace, train: KnownWarpFlow) -> RaftForOpticalFlow:
    settings = dict(variant="large", iters=args.iters, steps=args.parent_steps, lr=args.lr, batch=args.batch_size,
                    images=args.images, size=args.size, pairs=args.train_pairs, data_seed=args.data_seed)

    def fit(model: RaftForOpticalFlow, run_dir: Path) -> None:
        Trainer(model, TrainingArguments(**training_kwargs(args, run_dir, args.parent_steps, 0)),
                train_dataset=train).train()

    return cached_parent(args.output_dir, settings, RaftForOpticalFlow, lambda: build_model("large", args, 0), fit)


def run_child(args: argparse.Namespace, method: str, seed: int, parent: RaftForOpticalFlow, train: KnownWarpFlow,
              test: KnownWarpFlow) -> dict[str, Any]:
    """Train one RAFT-small child with `method` and evaluate it alone."""
    child = build_model("small", args, seed)
    kwargs = training_kwargs(args, Path(args.output_dir) / f"{method}-seed{seed}", args.steps, seed)
    start = time.perf_counter()
    if method == "alone":
        trainer = Trainer(child, TrainingArguments(**kwargs), train_dataset=train)
    else:
        # The KD baseline (L1 between the two final flows) needs carriers only to build; it trains none of them.
        hkt = kd_settings(args.kd_weight, loss="l1") if method == "kd" else dict(hkt_gate=args.gate)
        hkt_args = HKTTrainingArguments(**kwargs, hkt_carriers=CARRIERS.get(method, CARRIERS["hkt-2"]), **hkt)
        trainer = HKTTrainer(child, hkt_args, train_dataset=train, parent_model=parent)
    trainer.train()
    result = {"method": method, "seed": seed, "train_seconds": round(time.perf_counter() - start, 1)}
    result.update({k: round(v, 3) for k, v in evaluate_flow(child, test).items()})
    if method in CARRIERS:
        result["gates"] = last_gate_logs(trainer)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    train, test = load_data(args)
    parent = train_parent(args, train)
    parent_scores = {k: round(v, 3) for k, v in evaluate_flow(parent, test).items()}
    runs = run_all(args, args.methods, lambda m, s: run_child(args, m, s, parent, train, test))
    return write_result(
        "optical_flow.py", argv, args, start, parent, parent_scores, build_model("small", args, 0), runs, "epe",
        data=f"known warps of {args.images or 'CIFAR-10'} images, {args.size}x{args.size}, data_seed {args.data_seed}",
        train_pairs=len(train), eval_pairs=len(test), iters=args.iters,
        carriers={m: CARRIERS[m] for m in args.methods if m in CARRIERS}, gate=args.gate, steps=args.steps,
        parent_steps=args.parent_steps, batch_size=args.batch_size,
    )

if __name__ == "__main__":
    main()
