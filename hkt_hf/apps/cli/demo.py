"""`hkt-hf demo`: parent, child alone, KD and HKT trained and compared in about a minute on a CPU (the runs, table
and plot are in `hkt_hf.apps.demo`; this module reads the options and builds the task)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import CliError, Command, PositiveInt, label_column, label_count, load_dataset, load_model, \
    load_processor, pick_split


@dataclass
class DemoOptions:
    output_dir: str = field(default="hkt-demo", metadata={"help": "where the plot, table and runs go"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "metavar": "SEED", "help": "child seeds (initial weights and data order); the parent is trained once, with "
        "the first"})
    epochs: PositiveInt | None = field(default=None, metadata={"help": "epochs of every run (default: 12)"})
    threads: PositiveInt = field(default=1, metadata={
        "help": "CPU threads for torch; one is fastest for the tiny digits models, even on a busy machine"})
    no_progress: bool = field(default=False, metadata={"help": "hide the progress bars"})


@dataclass
class DemoDataOptions:
    _argument_group_name = "your own data and models (instead of the bundled digits)"  # read by HfArgumentParser

    dataset: str | None = field(default=None, metadata={
        "metavar": "DIR_OR_HUB_ID_OR_PARQUET", "help": "an image-classification dataset with image and label "
        "columns: a folder of <split>.parquet files, a .parquet file or a Hub id"})
    parent: str | None = field(default=None, metadata={
        "metavar": "DIR_OR_HUB_ID", "help": "an already trained parent (used frozen, not trained); default: train a "
        "CIFAR ResNet-14 parent first"})
    child: str | None = field(default=None, metadata={
        "metavar": "DIR_OR_HUB_ID", "help": "the starting child of the three child runs; default: a fresh CIFAR "
        "ResNet-8 (widths 4/8/16)"})
    train_split: str = field(default="train", metadata={"help": "the split to train on"})
    test_split: str = field(default="test", metadata={"help": "the split to compare the runs on"})
    max_train_samples: PositiveInt = field(default=5000, metadata={"help": "strided rows of the training split"})
    max_test_samples: PositiveInt = field(default=1000, metadata={"help": "strided rows of the test split"})


def demo_task(data: DemoDataOptions):
    """The digits task, or one built from --dataset / --parent / --child."""
    from datasets import DatasetDict

    from ..data.images import prepare_image_dataset, strided_subset
    from ..demo import DemoTask, cifar_resnet, digits_task
    from ..models import cifar_image_processor

    if not data.dataset:
        if data.parent or data.child:
            raise CliError("--parent and --child need --dataset: the bundled digits are 8x8 grey images with 10 "
                           "classes, which models trained elsewhere do not fit.")
        try:
            return digits_task()
        except ImportError as err:
            raise CliError(str(err)) from err

    dataset = load_dataset(data.dataset)
    splits = DatasetDict({
        "train": strided_subset(pick_split(dataset, data.dataset, data.train_split, "--train-split"),
                                data.max_train_samples),
        "test": strided_subset(pick_split(dataset, data.dataset, data.test_split, "--test-split"),
                               data.max_test_samples),
    })
    labels = label_count(splits["train"])
    parent = load_model(data.parent) if data.parent else None
    # Built-in models get the parent's label names (HKT checks that they match), else the dataset's.
    names = getattr(splits["train"].features[label_column(splits["train"])], "names", None)
    id2label = dict(parent.config.id2label) if parent is not None else dict(enumerate(names or map(str, range(labels))))
    source = data.child or data.parent
    processor = load_processor(source) if source else cifar_image_processor()
    if data.child:
        load_model(data.child)  # fail now, with the CLI's message, rather than in the middle of the runs
        make_child = lambda seed: load_model(data.child)  # noqa: E731
    else:
        make_child = lambda seed: cifar_resnet(8, (4, 8, 16), labels, 3, seed, id2label)  # noqa: E731
    probe = make_child(0)
    for role, model in (("child", probe), ("parent", parent)):
        if model is not None and model.config.num_labels < labels:
            raise CliError(f"The {role} predicts {model.config.num_labels} classes but the dataset has {labels}.")
    try:
        prepared = prepare_image_dataset(splits, processor, train_split=None,
                                         num_channels=getattr(probe.config, "num_channels", 3))
    except ValueError as err:
        raise CliError(f"{err} The demo needs an image column and an integer label column.") from err
    return DemoTask(
        name=f"{data.dataset} ({len(splits['train'])} train / {len(splits['test'])} test images)",
        train=prepared["train"], test=prepared["test"], make_child=make_child, parent=parent,
        make_parent=None if parent is not None else (lambda seed: cifar_resnet(14, (16, 32, 64), labels, 3, seed,
                                                                               id2label)),
    )


def run(options: DemoOptions, data: DemoDataOptions) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ..demo import DemoRecipe, format_table, plot_report, run_demo

    torch.set_num_threads(options.threads)
    hf_logging.set_verbosity_error()  # the runs' own logs are summarised in the table
    task = demo_task(data)
    recipe = DemoRecipe() if options.epochs is None else DemoRecipe(epochs=options.epochs)
    print(f"HKT demo on {task.name}: parent, then child alone, KD and HKT for seed(s) "
          f"{', '.join(map(str, options.seeds))}")
    try:
        report = run_demo(task, options.output_dir, seeds=options.seeds, recipe=recipe,
                          progress=not options.no_progress)
    except (ValueError, TypeError) as err:  # e.g. a parent and child HKT cannot pair
        raise CliError(str(err)) from err
    table = format_table(report)
    out = Path(options.output_dir)
    (out / "demo.txt").write_text(table + "\n")
    plot = plot_report(report, out / "demo.png")
    print()
    print(table)
    print(f"Wrote {plot} and {out / 'demo.txt'}.")
    return 0


COMMAND = Command(
    name="demo",
    summary="the whole HKT story in about a minute on a CPU: parent, child alone, KD and HKT compared",
    description="""
Train, under one recipe, a parent, a child alone, the child with classic knowledge distillation (KD) and the child
with HKT, then print a table (test top-1 of each, parameter counts, HKT's mean gate a and mixing weight
lambda*(1-a)) and write demo.png (accuracy bars and training-loss curves) and demo.txt to --output-dir.

By default it runs offline on scikit-learn's bundled handwritten digits (1,797 grey 8x8 images; a fixed stratified
75/25 split): a CIFAR ResNet-14 parent (172k parameters) and a ResNet-8 child (5k), 12 epochs, 3 child seeds.
With --dataset (and optionally --parent/--child) the same comparison runs on any image-classification data.
The table reports what happened, including when HKT does not beat the child alone.""",
    examples="""
examples:
  hkt-hf demo
  hkt-hf demo --seeds 0 --output-dir /tmp/hkt-demo
  hkt-hf demo --dataset uoft-cs/cifar10 --epochs 5 --threads 4
  hkt-hf demo --dataset data/cifar10 --parent resnet56-4bfd9763.th --child resnet20-12fca82f.th --epochs 1""",
    options=(DemoOptions, DemoDataOptions),
    run=run,
)
