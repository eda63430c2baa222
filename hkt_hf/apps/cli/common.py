"""What the `hkt-hf` commands share: the `Command` record, option helpers for `HfArgumentParser` dataclasses, the
user-error type, and the loaders of models, image processors and datasets with their clear error messages.

A command's options are dataclasses: `HfArgumentParser` turns every field into a flag (`--batch_size`, also spelt
`--batch-size`); a field made with `positional(...)` is a positional argument instead. Wrong user input raises
`CliError`, which `main` prints (with the fix, not a traceback) and turns into exit code 2, the code argparse uses
for a bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

PROG = "hkt-hf"


class CliError(Exception):
    """A user error: the message says what was wrong and how to fix it; `main` exits with code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help; the description and examples printed as written."""


class PositiveInt(int):
    """An option type (a dataclass field annotation) that accepts only positive integers."""

    def __new__(cls, text: Any) -> PositiveInt:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
        return super().__new__(cls, value)


def positional(metavar: str, help: str, **kwargs: Any) -> Any:
    """A dataclass field read as a positional argument. `HfArgumentParser` makes flags of `init` fields only, so the
    field is `init=False`; `command_parser` adds it as a positional and `options_from` fills it in."""
    return field(default=None, init=False, metadata={"metavar": metavar, "help": help, **kwargs})


@dataclass(frozen=True)
class Command:
    """One `hkt-hf NAME` command: its help texts, its option dataclasses and `run(*options) -> exit code`."""

    name: str
    summary: str  # one line, shown in `hkt-hf --help`
    description: str  # shown in `hkt-hf NAME --help`
    examples: str  # shown at the end of `hkt-hf NAME --help`
    options: tuple[type, ...]
    run: Callable[..., int]
    usage: str | None = None
    # (parsed namespace, the command's own arguments) -> the option dataclasses; default: `options_from`
    parse: Callable[[argparse.Namespace, list[str]], tuple] | None = None


def command_parser(cmd: Command, add_parser: Callable[..., argparse.ArgumentParser] | None = None,
                   **kwargs: Any) -> HfArgumentParser:
    """The parser of one command: a subparser when `add_parser` (a subparsers' method) is given, else standalone."""
    options = dict(description=cmd.description.strip(), epilog=cmd.examples.strip(), formatter_class=HelpFormatter,
                   usage=cmd.usage, **kwargs)
    if add_parser is None:
        parser = HfArgumentParser(cmd.options, prog=f"{PROG} {cmd.name}", **options)
    else:
        parser = add_parser(cmd.name, dataclass_types=cmd.options, **options)
    for dtype in cmd.options:
        for f in fields(dtype):
            if not f.init:
                parser.add_argument(f.name, **f.metadata)
    return parser


def options_from(namespace: argparse.Namespace, types: Sequence[type]) -> tuple:
    """The option dataclasses of a command from its parsed namespace. A dataclass that refuses its values (a
    `ValueError` of its own checks, e.g. TrainingArguments') is a user error."""
    parsed = HfArgumentParser(types).parse_dict(vars(namespace), allow_extra_keys=True)
    for options in parsed:
        for f in fields(options):
            if not f.init and hasattr(namespace, f.name):
                setattr(options, f.name, getattr(namespace, f.name))
    return parsed


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def looks_like_local_path(name: str) -> bool:
    """True for names that cannot be Hub ids (`owner/name` or `name`), so a missing one is a typo, not a download."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".parquet", ".th", ".pth", ".safetensors", ".json"))
    )


def is_reference_checkpoint(name: str) -> bool:
    return Path(name).suffix in (".th", ".pth") and Path(name).is_file()


def load_model(name: str):
    """An image classifier from a save_pretrained folder, a Hub id or a reference CIFAR checkpoint (*.th/*.pth)."""
    from transformers import AutoModelForImageClassification

    if is_reference_checkpoint(name):
        from ..models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

        try:
            return import_checkpoint(name)
        except ValueError as err:
            raise CliError(f"{err} Pass a reference CIFAR ResNet checkpoint, or a save_pretrained folder.") from err
    if not Path(name).exists() and looks_like_local_path(name):
        raise CliError(
            f"No model folder at {name}. Pass a folder written by save_pretrained or `{PROG} import-checkpoint`, "
            "or a Hub model id such as owner/name."
        )
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise CliError(
            f"{name} has no config.json, so it is not a save_pretrained model folder. Create one with "
            f"`{PROG} import-checkpoint SRC {name}` or model.save_pretrained({name!r})."
        )
    try:
        return AutoModelForImageClassification.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise CliError(
            f"Could not load an image-classification model from {name}: {err}\n"
            "Pass a local save_pretrained folder, or a Hub model id reachable from this machine."
        ) from err


def load_processor(name: str):
    from transformers import AutoImageProcessor

    from ..models import cifar_image_processor

    if is_reference_checkpoint(name):
        return cifar_image_processor()  # what the reference checkpoints were trained with
    if Path(name).is_dir() and not (Path(name) / "preprocessor_config.json").is_file():
        reason = f"{name} has no preprocessor_config.json"
    else:
        try:
            return AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            reason = f"no image processor could be loaded from {name} ({type(err).__name__})"
    warn(f"{reason}; using the CIFAR default (32x32, ImageNet mean/std). Save the processor the model was trained "
         "with next to it (processor.save_pretrained(DIR)) to silence this.")
    return cifar_image_processor()


def load_dataset(name: str):
    """A `DatasetDict` from a folder of <split>.parquet files, one .parquet file or a Hub id, or a `CliError`."""
    from datasets import DatasetDict

    from ..data.images import load_image_dataset

    if not Path(name).exists() and looks_like_local_path(name):
        raise CliError(
            f"No dataset at {name}. Pass a folder of <split>.parquet files, a .parquet file, or a Hub dataset id "
            "such as uoft-cs/cifar10."
        )
    try:
        dataset = load_image_dataset(name)
    except FileNotFoundError as err:
        raise CliError(f"{err} Pass a folder of <split>.parquet files, a .parquet file, or a Hub dataset id.") from err
    except (OSError, ValueError) as err:  # Hub errors (unknown id, offline) are OSError/ValueError subclasses
        raise CliError(f"Could not load the dataset {name}: {type(err).__name__}: {err}") from err
    if not isinstance(dataset, DatasetDict):
        raise CliError(f"{name} did not load as a dataset with named splits.")
    return dataset


def pick_split(dataset, name: str, split: str, flag: str = "--split"):
    if split not in dataset:
        available = ", ".join(sorted(dataset))
        raise CliError(
            f"The dataset {name} has no split {split!r}; available splits: {available}. Pass one of them with {flag}."
        )
    return dataset[split]


def load_split(name: str, split: str):
    return pick_split(load_dataset(name), name, split)


def label_column(split) -> str:
    from ..data.images import LABEL_COLUMNS, find_column

    try:
        return find_column(split.column_names, LABEL_COLUMNS, "label")
    except ValueError as err:
        raise CliError(f"{err} Image classification needs an integer label column.") from err


def label_count(split) -> int:
    """Classes of a split's label column: its ClassLabel size, else the largest label + 1."""
    column = label_column(split)
    return getattr(split.features[column], "num_classes", None) or int(max(split[column])) + 1
