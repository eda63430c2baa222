"""The `hkt-hf` command line.

Every subcommand is one function registered with `@subcommand(...)`: the decorator records its name, help texts
and an `arguments(parser)` function that declares its options; `build_parser()` turns the registry into argparse
subparsers. Adding `train`, `push` or `demo` later means writing one more registered function, nothing else.

A subcommand returns an exit code. Wrong user input raises `CliError`, which `main` prints (with the fix, not a
traceback) and turns into exit code 2, the same code argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__

PROG = "hkt-hf"


class CliError(Exception):
    """A user error: the message says what was wrong and how to fix it; `main` exits with code 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    summary: str  # one line, shown in `hkt-hf --help`
    description: str  # shown in `hkt-hf NAME --help`
    examples: str  # shown at the end of `hkt-hf NAME --help`
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str,
    *,
    summary: str,
    description: str,
    examples: str,
    arguments: Callable[[argparse.ArgumentParser], None],
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated `run(args) -> exit code` function as `hkt-hf NAME`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in SUBCOMMANDS:
            raise ValueError(f"Subcommand {name!r} is registered twice.")
        SUBCOMMANDS[name] = Subcommand(name, summary, description.strip(), examples.strip(), arguments, run)
        return run

    return register


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _looks_like_local_path(name: str) -> bool:
    """True for names that cannot be Hub ids (`owner/name` or `name`), so a missing one is a typo, not a download."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".parquet", ".th", ".pth", ".safetensors", ".json"))
    )


# --------------------------------------------------------------------------------------------- import-checkpoint


def _import_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="reference checkpoint file (*.th or *.pth) with a 'state_dict'")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if needed; files are overwritten)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle arbitrary Python objects when the safe tensor-only loader refuses the file; "
        "only for files whose origin you trust",
    )


@subcommand(
    "import-checkpoint",
    summary="convert a reference CIFAR ResNet checkpoint (*.th/*.pth) into a transformers model folder",
    description="""
Convert a reference CIFAR ResNet checkpoint (the public `resnet20-12fca82f.th` family, or an HKT `*.pth`) into a
`save_pretrained` folder: model.safetensors, config.json and preprocessor_config.json (32x32, ImageNet mean/std).
The depth (6n+2) is inferred from the weights. The folder then loads anywhere with
`AutoModelForImageClassification.from_pretrained(OUT_DIR)` once `hkt_hf` is imported, and works with
`hkt-hf evaluate` and `pipeline("image-classification", model=OUT_DIR)`.""",
    examples="""
examples:
  hkt-hf import-checkpoint resnet20-12fca82f.th models/resnet20
  hkt-hf import-checkpoint hkt-resnet20.pth models/hkt-resnet20
  hkt-hf evaluate --model models/resnet20 --dataset data/cifar10""",
    arguments=_import_checkpoint_arguments,
)
def import_checkpoint_command(args: argparse.Namespace) -> int:
    from .checkpoint import import_checkpoint

    try:
        model = import_checkpoint(args.src, args.out_dir, allow_pickle=args.allow_pickle)
    except FileNotFoundError as err:
        raise CliError(f"{err} Pass the path of an existing *.th or *.pth file as SRC.") from err
    except ValueError as err:
        raise CliError(str(err)) from err
    out_dir = Path(args.out_dir).resolve()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Imported {args.src}: CIFAR ResNet depth {model.config.depth}, {n_params:,} parameters, "
          f"{model.config.num_labels} labels.")
    print(f"Saved to {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))}).")
    print(f"Evaluate it with: {PROG} evaluate --model {args.out_dir} --dataset DATASET")
    return 0


# ------------------------------------------------------------------------------------------------------ evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="DIR_OR_HUB_ID",
        help="a save_pretrained folder (e.g. from import-checkpoint) or a Hub model id",
    )
    parser.add_argument(
        "--dataset", required=True, metavar="DIR_OR_HUB_ID_OR_PARQUET",
        help="a folder of <split>.parquet files, one .parquet file (its split is the file name), or a Hub dataset "
        "id; columns as in uoft-cs/cifar10 (img/image, label/labels)",
    )
    parser.add_argument("--split", default="test", help="split to evaluate on (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass "
                        "(default: %(default)s)")
    parser.add_argument(
        "--limit", type=positive_int, default=None, metavar="N",
        help="evaluate on N rows spread evenly over the split (a strided subset, so label-sorted data stays "
        "balanced) instead of all of it",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps "
                        "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _load_model(name: str):
    from transformers import AutoModelForImageClassification

    if not Path(name).exists() and _looks_like_local_path(name):
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


def _load_processor(name: str):
    from transformers import AutoImageProcessor

    from .models import cifar_image_processor

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


def _load_split(name: str, split: str):
    from datasets import DatasetDict

    from .data import load_image_dataset

    if not Path(name).exists() and _looks_like_local_path(name):
        raise CliError(
            f"No dataset at {name}. Pass a folder of <split>.parquet files, a .parquet file, or a Hub dataset id "
            "such as uoft-cs/cifar10."
        )
    if Path(name).is_file() and Path(name).suffix != ".parquet":
        raise CliError(f"{name} is not a .parquet file. Pass a folder of <split>.parquet files or one .parquet file.")
    try:
        dataset = load_image_dataset(name)
    except FileNotFoundError as err:
        raise CliError(f"{err} Pass a folder of <split>.parquet files, a .parquet file, or a Hub dataset id.") from err
    except (OSError, ValueError) as err:  # Hub errors (unknown id, offline) are OSError/ValueError subclasses
        raise CliError(f"Could not load the dataset {name}: {type(err).__name__}: {err}") from err
    if not isinstance(dataset, DatasetDict):
        raise CliError(f"{name} did not load as a dataset with named splits.")
    if split not in dataset:
        available = ", ".join(sorted(dataset))
        raise CliError(
            f"The dataset {name} has no split {split!r}; available splits: {available}. "
            f"Pass one of them with --split."
        )
    return dataset[split]


@subcommand(
    "evaluate",
    summary="top-1 accuracy of an image-classification model on a dataset split",
    description="""
Top-1 accuracy of an image-classification model on one split of a dataset: the number every HKT comparison
reports. Images are only preprocessed (no augmentation), with the image processor saved next to the model (the
CIFAR default, with a warning, if there is none). Rows of the shared CIFAR-10 parquet files are sorted by label,
so --limit takes an evenly strided subset, never the first N rows.""",
    examples="""
examples:
  hkt-hf evaluate --model models/resnet20 --dataset data/cifar10
  hkt-hf evaluate --model models/resnet20 --dataset data/cifar10/test.parquet --limit 1000 --json
  hkt-hf evaluate --model models/resnet56 --dataset uoft-cs/cifar10 --device cuda --batch-size 1024""",
    arguments=_evaluate_arguments,
)
def evaluate_command(args: argparse.Namespace) -> int:
    import torch
    from datasets import DatasetDict

    from .data import prepare_image_dataset, strided_subset
    from .evaluation import top1_accuracy

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise CliError(f"Unknown --device {args.device!r}: {err}. Use e.g. cpu or cuda.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {args.device} was asked for, but CUDA is not available here. Use --device cpu.")

    model = _load_model(args.model)
    processor = _load_processor(args.model)
    split = strided_subset(_load_split(args.dataset, args.split), args.limit)
    try:
        # train_split=None: no split gets the training augmentation, whatever its name.
        prepared = prepare_image_dataset(
            DatasetDict({args.split: split}), processor, train_split=None,
            num_channels=getattr(model.config, "num_channels", 3),
        )[args.split]
    except ValueError as err:
        raise CliError(f"{err} Evaluate needs an image column and an integer label column.") from err

    accuracy = top1_accuracy(model, prepared, batch_size=args.batch_size, device=device,
                             progress=not args.no_progress)
    if args.json:
        print(json.dumps({
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split,
            "num_images": len(prepared),
            "top1_accuracy": accuracy,
        }))
    else:
        print(f"top-1 accuracy: {accuracy:.2f} % on {len(prepared)} images")
    return 0


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hereditary Knowledge Transfer (HKT) for Hugging Face transformers: import, evaluate and "
        "compress image classifiers.",
        epilog=f"Run `{PROG} COMMAND --help` for the options and examples of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in SUBCOMMANDS.values():
        sub = commands.add_parser(
            cmd.name,
            help=cmd.summary,
            description=cmd.description,
            epilog=cmd.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hkt-hf`; returns the exit code (0 success, 2 wrong usage or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
