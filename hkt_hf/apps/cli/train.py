"""`hkt-hf train`: a child image classifier trained with HKT from a frozen parent, through `HKTTrainer`.

The options are `HKTTrainingArguments` (every TrainingArguments and HKT field is a flag) and this command's own
dataclasses, parsed by `HfArgumentParser`; a YAML or JSON config file is read by `HfArgumentParser.parse_yaml_file`
/ `parse_json_file`, and the flags given on the command line override its values.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import HfArgumentParser

from hkt_hf.training_args import HKTTrainingArguments
from .common import PROG, CliError, Command, command_parser, label_count, load_dataset, load_model, load_processor, \
    options_from, pick_split, positional


@dataclass
class ConfigFileOptions:
    config_file: str | None = positional("CONFIG", "a YAML or JSON file whose keys are the flags below without "
                                         "dashes; flags given on the command line override it", nargs="?")
    config: str | None = field(default=None, metadata={"metavar": "CONFIG", "help": "the same, as an option"})


@dataclass
class TrainOptions:
    """What `hkt-hf train` reads besides `HKTTrainingArguments` (every field is a flag and a config-file key)."""

    child: str | None = field(default=None, metadata={
        "help": "the child to train: a save_pretrained folder, a Hub model id, or a reference CIFAR checkpoint "
        "(*.th/*.pth). Its image processor is used for the data (CIFAR default if it has none)."})
    parent: str | None = field(default=None, metadata={
        "help": "the frozen parent, same forms as --child (same as --hkt_parent; give one of the two)"})
    dataset: str | None = field(default=None, metadata={
        "help": "a folder of <split>.parquet files, one .parquet file, or a Hub dataset id, with an image column "
        "(img/image) and an integer label column (label/labels)"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: str = field(default="test", metadata={"help": "split the child and parent are evaluated on"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "train on N rows spread evenly over the split (strided, so label-sorted data stays balanced)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on N strided rows"})
    augment: bool = field(default=True, metadata={
        "help": "random crop (pad 4) and horizontal flip on the training split (--no_augment to switch off)"})


@dataclass
class TrainArguments(HKTTrainingArguments):
    """`HKTTrainingArguments` with this command's defaults: on-the-fly image transforms need the raw image column."""

    output_dir: str | None = field(default="hkt-child", metadata={"help": "where the child and its metrics go"})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "keep False: True drops the image column the on-the-fly transforms need"})


FILE_OPTIONS = (TrainOptions, TrainArguments)  # what a config file may set


def read_config(path: str) -> tuple[TrainOptions, TrainArguments]:
    """The options a YAML or JSON config file sets (the other fields at their defaults), or a `CliError`."""
    import json

    import yaml

    file = Path(path)
    if not file.is_file():
        raise CliError(f"No config file at {path}. Pass a YAML (.yaml/.yml) or JSON (.json) file.")
    parser = HfArgumentParser(FILE_OPTIONS)
    kind = "JSON" if file.suffix == ".json" else "YAML"
    try:
        return parser.parse_json_file(file) if kind == "JSON" else parser.parse_yaml_file(file)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CliError(f"{path} is not valid {kind}: {err}") from err
    except AttributeError as err:  # parse_dict calls .keys() on what the file holds
        raise CliError(f"{path} must hold a mapping of option names to values, e.g. `learning_rate: 0.01`.") from err
    except ValueError as err:
        unused = re.search(r"not used by the HfArgumentParser: (\[.*\])", str(err))
        if not unused:
            raise CliError(f"{path}: {err} (see `{PROG} train --help`)") from err
        known = [f.name for cls in FILE_OPTIONS for f in fields(cls) if f.init]
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
                 for key in ast.literal_eval(unused.group(1))]
        raise CliError(f"{path} has unknown keys: {', '.join(hints)}. Keys are the flag names of "
                       f"`{PROG} train --help` without the leading dashes.") from err


def parse(namespace: argparse.Namespace, argv: list[str]) -> tuple[TrainOptions, TrainArguments]:
    """The command line on top of the config file: the file's values become defaults, flags override them."""
    if namespace.config_file and namespace.config:
        raise CliError("Give the config file once: either as CONFIG or with --config.")
    config = namespace.config_file or namespace.config
    if config:
        parser = command_parser(COMMAND)
        parser.set_defaults(**{f.name: getattr(o, f.name) for o in read_config(config) for f in fields(o) if f.init})
        namespace = parser.parse_args(argv)
    (data,) = options_from(namespace, (TrainOptions,))
    if data.parent and namespace.hkt_parent and data.parent != namespace.hkt_parent:
        raise CliError(f"--parent {data.parent} and --hkt_parent {namespace.hkt_parent} disagree; give only one.")
    namespace.hkt_parent = data.parent or namespace.hkt_parent
    (training,) = options_from(namespace, (TrainArguments,))
    return data, training


def run(data: TrainOptions, training_args: TrainArguments) -> int:
    from datasets import DatasetDict

    from ..data.images import image_collator, prepare_image_dataset, strided_subset
    from ..metrics import top1_accuracy
    from hkt_hf.trainer import HKTTrainer

    missing = [flag for flag, value in (("--child", data.child), ("--parent", training_args.hkt_parent),
                                        ("--dataset", data.dataset)) if not value]
    if missing:
        raise CliError(f"Missing {', '.join(missing)}. `{PROG} train` needs a child, a parent and a dataset "
                       f"(flags or config-file keys); see `{PROG} train --help`.")
    if training_args.remove_unused_columns:
        raise CliError("--remove_unused_columns True drops the image column the on-the-fly transforms need; "
                       "leave it at its default (False).")

    child = load_model(data.child)
    parent = load_model(training_args.hkt_parent)
    processor = load_processor(data.child)
    dataset = load_dataset(data.dataset)
    splits = DatasetDict({
        data.train_split: strided_subset(pick_split(dataset, data.dataset, data.train_split, "--train_split"),
                                         data.max_train_samples),
        data.eval_split: strided_subset(pick_split(dataset, data.dataset, data.eval_split, "--eval_split"),
                                        data.max_eval_samples),
    })
    labels = label_count(splits[data.train_split])
    for role, model in (("child", child), ("parent", parent)):
        if model.config.num_labels < labels:
            raise CliError(f"The {role} predicts {model.config.num_labels} classes but the dataset has {labels}. "
                           f"Pass a {role} trained for this label set.")
    try:
        prepared = prepare_image_dataset(splits, processor, train_split=data.train_split if data.augment else None,
                                         num_channels=getattr(child.config, "num_channels", 3))
        trainer = HKTTrainer(child, training_args, train_dataset=prepared[data.train_split],
                             eval_dataset=prepared[data.eval_split], data_collator=image_collator(),
                             parent_model=parent)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err
    trainer.train()

    device, eval_set = training_args.device, prepared[data.eval_split]
    batch = training_args.per_device_eval_batch_size
    child_top1 = top1_accuracy(trainer.model, eval_set, batch_size=batch, device=device,
                               progress=not training_args.disable_tqdm)
    parent_top1 = top1_accuracy(trainer.parent_model, eval_set, batch_size=batch, device=device,
                                progress=not training_args.disable_tqdm)
    out_dir = training_args.output_dir
    trainer.save_model(out_dir)
    processor.save_pretrained(out_dir)
    trainer.save_metrics("eval", {"top1_accuracy": child_top1, "parent_top1_accuracy": parent_top1})
    print(f"child top-1: {child_top1:.2f} %, parent top-1: {parent_top1:.2f} % on {len(eval_set)} images of "
          f"{data.dataset} [{data.eval_split}]")
    print(f"Saved the child to {Path(out_dir).resolve()}; share it with: {PROG} push {out_dir} REPO_ID")
    return 0


COMMAND = Command(
    name="train",
    summary="train a small image classifier (the child) with HKT from a frozen larger one (the parent)",
    description="""
Train a child image classifier with Hereditary Knowledge Transfer from a frozen parent, through HKTTrainer (a
transformers Trainer), then report the test top-1 of both and save the plain child with its image processor and
hkt_config.json (the lineage record). The parent is only needed during training: the saved child runs alone.

Every HKTTrainingArguments field is a flag: all of transformers' TrainingArguments (--learning_rate,
--num_train_epochs, --per_device_train_batch_size, --optim, --bf16, ...) and the HKT ones (--hkt_carriers,
--hkt_gate, --hkt_lambda, --hkt_loss_weights, --hkt_kd_weight, ...). The same names work as keys of a YAML or JSON
config file (`hkt-hf train run.yaml`); flags on the command line override the file.""",
    examples="""
examples:
  # the paper's CIFAR-10 setting from the reference checkpoints (SGD lr 0.01, momentum 0.9, wd 1e-4, batch 128)
  hkt-hf train --child resnet20-12fca82f.th --parent resnet56-4bfd9763.th --dataset data/cifar10 \\
      --learning_rate 0.01 --optim sgd --optim_args momentum=0.9 --weight_decay 1e-4 \\
      --per_device_train_batch_size 128 --num_train_epochs 1 --output_dir hkt-resnet20
  # the same from a config file, overriding one value
  hkt-hf train run.yaml --num_train_epochs 5
  # classic KD instead, for comparison (native loss + KD term only)
  hkt-hf train run.yaml --hkt_loss_weights 1 0 0 --hkt_kd_weight 1 --output_dir kd-resnet20
  # then share the child
  hkt-hf push hkt-resnet20 your-name/hkt-resnet20""",
    options=(ConfigFileOptions, TrainOptions, TrainArguments),
    run=run,
    usage=f"{PROG} train [CONFIG] --child CHILD --parent PARENT --dataset DATASET [--output_dir DIR] "
          "[any TrainingArguments / HKT flag ...]",
    parse=parse,
)
