"""HKT for semantic segmentation: a larger SegFormer parent teaches a smaller SegFormer child through HKTTrainer.

Compares, under one recipe and the same child initialisation per seed: the child trained alone, the child trained
with classic per-pixel KD from the parent, and the child trained with HKT on several carriers at different depths
(feature maps [B, C, H, W] gated per spatial position, and token sequences [B, N, D] gated per token). Reports mean
IoU (and pixel accuracy) of the child alone at evaluation, never the parent or the gates.

Data. By default: the "pasted objects" task of `hkt_hf.apps.data.segmentation`, built from real CIFAR-10 images (2-4 images
pasted onto a 64x64 random background, mask = CIFAR class + 1 over each pasted square, 0 = background, 11 labels);
training scenes come from the CIFAR train split, evaluation scenes from the test split, seeded and reproducible.
It is a synthetic layout of real photographs, not a natural segmentation benchmark. `--dataset` takes any
segmentation dataset with image and mask columns instead (a Hub id or a local folder of parquet files).

The parent is first trained on the task (cached under `--output_dir`, keyed by its settings), then frozen.

    python examples/segmentation.py --quick                  # CI smoke run, < 1 minute on 2 cores
    python examples/segmentation.py --json benchmarks/results/segmentation.json
    python examples/segmentation.py --dataset scene_parse_150 --num_labels 150 --reduce_labels --image_size 128

The last line prints one JSON object with every metric.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.apps.data.images import CIFAR10_HUB_ID, load_image_dataset, strided_subset
from hkt_hf.apps.data.segmentation import make_pasted_segmentation, prepare_segmentation_dataset
from hkt_hf.apps.metrics import evaluate_segmentation

# The comparison harness (resumable run log, KD baseline settings, cached parent) is the benchmarks' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from comparison import cached_parent, comparison_parser, kd_settings, last_gate_logs  # noqa: E402
from comparison import parse_comparison_args, run_all, write_result  # noqa: E402

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
PASTED_LABELS = 11  # background + 10 CIFAR classes
PARENT = dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 5, 8],
              decoder_hidden_size=128)
CHILD = dict(hidden_sizes=[16, 32, 80, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
             decoder_hidden_size=64)
# Three depths at once: an early stage's feature map, a middle transformer block's tokens, the decoder's fused map.
CARRIERS = [
    "segformer.stages.1=segformer.stages.1",
    "segformer.stages.2.blocks.1=segformer.stages.2.blocks.0",
    "decode_head.linear_fuse=decode_head.linear_fuse",
]
QUICK = dict(train_scenes=128, eval_scenes=64, parent_epochs=2, epochs=1, seeds=[0], logging_steps=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = comparison_parser(__doc__.split("\n\n")[0], "runs/segmentation",
                          "Tiny smoke run (CI): few scenes, few epochs, one seed.", batch_size=32, lr=2e-3,
                          logging_steps=10)
    p.add_argument("--dataset", help="Hub id or local parquet folder of a segmentation dataset (default: pasted).")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval_split", default="validation")
    p.add_argument("--num_labels", type=int, help="Classes of --dataset (required with it); pasted CIFAR has 11.")
    p.add_argument("--reduce_labels", action="store_true", help="--dataset masks use 0 = 'other': shift labels down.")
    p.add_argument("--images", help=f"Images for the pasted task (default: shared CIFAR-10, else {CIFAR10_HUB_ID}).")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--train_scenes", type=int, default=1024, help="Training scenes (or rows of --dataset).")
    p.add_argument("--eval_scenes", type=int, default=256, help="Evaluation scenes (or rows of --dataset).")
    p.add_argument("--parent_epochs", type=float, default=10)
    p.add_argument("--epochs", type=float, default=8, help="Epochs of every child run.")
    p.add_argument("--carriers", nargs="+", default=CARRIERS, help="HKT carrier pairs 'parent.module=child.module'.")
    p.add_argument("--kd_temperature", type=float, default=2.0)
    args = parse_comparison_args(p, argv, QUICK)
    if args.dataset and args.num_labels is None:
        p.error("--dataset needs --num_labels (the number of classes in its masks).")
    return args


def load_data(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Prepared train and eval datasets and the number of labels."""
    processor = SegformerImageProcessorPil(
        size={"height": args.image_size, "width": args.image_size}, do_reduce_labels=args.reduce_labels
    )
    if args.dataset:
        data = load_image_dataset(args.dataset)
        missing = [s for s in (args.train_split, args.eval_split) if s not in data]
        if missing:
            raise SystemExit(f"{args.dataset} has no split(s) {missing}; it has {list(data)}. "
                             "Use --train_split / --eval_split.")
        train = strided_subset(data[args.train_split], args.train_scenes)
        test = strided_subset(data[args.eval_split], args.eval_scenes)
        num_labels = args.num_labels
    else:
        source = args.images or (str(SHARED_CIFAR) if SHARED_CIFAR.is_dir() else CIFAR10_HUB_ID)
        images = load_image_dataset(source)
        train = make_pasted_segmentation(images["train"], args.train_scenes, args.data_seed, size=args.image_size)
        test = make_pasted_segmentation(images["test"], args.eval_scenes, args.data_seed + 1, size=args.image_size)
        num_labels = PASTED_LABELS
    return (prepare_segmentation_dataset(train, processor, train=True),
            prepare_segmentation_dataset(test, processor, train=False), num_labels)


def build_model(sizes: dict, num_labels: int, seed: int) -> SegformerForSemanticSegmentation:
    set_seed(seed)
    config = SegformerConfig(num_labels=num_labels, sr_ratios=[4, 2, 1, 1], semantic_loss_ignore_index=255, **sizes)
    return SegformerForSemanticSegmentation(config)


def training_kwargs(args: argparse.Namespace, output_dir: Path, epochs: float, seed: int) -> dict[str, Any]:
    return dict(
        output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=10, lr_scheduler_type="cosine", seed=seed,
        save_strategy="no", report_to="none", logging_steps=args.logging_steps, remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0,
    )


def train_parent(args: argparse.Namespace, train, num_labels: int) -> SegformerForSemanticSegmentation:
    settings = dict(PARENT, num_labels=num_labels, epochs=args.parent_epochs, lr=args.lr, batch=args.batch_size,
                    dataset=args.dataset or "pasted", images=args.images, size=args.image_size,
                    scenes=args.train_scenes, data_seed=args.data_seed, reduce=args.reduce_labels)

    def fit(model: SegformerForSemanticSegmentation, run_dir: Path) -> None:
        Trainer(model, TrainingArguments(**training_kwargs(args, run_dir, args.parent_epochs, 0)),
                train_dataset=train).train()

    return cached_parent(args.output_dir, settings, SegformerForSemanticSegmentation,
                         lambda: build_model(PARENT, num_labels, seed=0), fit)


def run_child(args, method: str, seed: int, parent, train, test, num_labels: int) -> dict[str, Any]:
    """Train one child with `method` ('alone', 'kd' or 'hkt') and evaluate it alone."""
    child = build_model(CHILD, num_labels, seed)
    out = Path(args.output_dir) / f"{method}-seed{seed}"
    kwargs = training_kwargs(args, out, args.epochs, seed)
    start = time.perf_counter()
    if method == "alone":
        trainer = Trainer(child, TrainingArguments(**kwargs), train_dataset=train)
    else:
        hkt = kd_settings(args.kd_weight, args.kd_temperature) if method == "kd" else dict(hkt_gate=args.gate)
        hkt_args = HKTTrainingArguments(**kwargs, hkt_carriers=args.carriers, **hkt)
        trainer = HKTTrainer(child, hkt_args, train_dataset=train, parent_model=parent)
    trainer.train()
    result = {"method": method, "seed": seed, "train_seconds": round(time.perf_counter() - start, 1)}
    result.update({k: round(v, 2) for k, v in evaluate_segmentation(child, test, num_labels).items()})
    if method == "hkt":
        result["gates"] = last_gate_logs(trainer)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    train, test, num_labels = load_data(args)
    parent = train_parent(args, train, num_labels)
    parent_scores = {k: round(v, 2) for k, v in evaluate_segmentation(parent, test, num_labels).items()}
    runs = run_all(args, ["alone", "kd", "hkt"], lambda m, s: run_child(args, m, s, parent, train, test, num_labels))
    return write_result(
        "segmentation.py", argv, args, start, parent, parent_scores, build_model(CHILD, num_labels, 0), runs,
        "mean_iou",
        data=args.dataset or f"pasted CIFAR-10, {args.image_size}x{args.image_size}, data_seed {args.data_seed}",
        train_rows=len(train), eval_rows=len(test), num_labels=num_labels, carriers=args.carriers, gate=args.gate,
        epochs=args.epochs, parent_epochs=args.parent_epochs,
    )

if __name__ == "__main__":
    main()
