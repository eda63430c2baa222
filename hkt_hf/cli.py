"""The `hkt-hf` command line.

Every subcommand is one function registered with `@subcommand(...)`: the decorator records its name, help texts
and an `arguments(parser)` function that declares its options; `build_parser()` turns the registry into argparse
subparsers. Adding `train`, `push` or `demo` later means writing one more registered function, nothing else.

A subcommand returns an exit code. Wrong user input raises `CliError`, which `main` prints (with the fix, not a
traceback) and turns into exit code 2, the same code argparse uses for a bad command line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .training_args import HKTTrainingArguments

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
    from .models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

    try:
        model = import_checkpoint(args.src, args.out_dir, allow_pickle=args.allow_pickle)
    except FileNotFoundError as err:
        raise CliError(f"{err} Pass the path of an existing *.th or *.pth file as SRC.") from err
    except ValueError as err:
        raise CliError(str(err)) from err
    out_dir = Path(args.out_dir).resolve()
    n_params = model.num_parameters()
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


def _is_reference_checkpoint(name: str) -> bool:
    return Path(name).suffix in (".th", ".pth") and Path(name).is_file()


def _load_model(name: str):
    """An image classifier from a save_pretrained folder, a Hub id or a reference CIFAR checkpoint (*.th/*.pth)."""
    from transformers import AutoModelForImageClassification

    if _is_reference_checkpoint(name):
        from .models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

        try:
            return import_checkpoint(name)
        except ValueError as err:
            raise CliError(f"{err} Pass a reference CIFAR ResNet checkpoint, or a save_pretrained folder.") from err
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

    if _is_reference_checkpoint(name):
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


def _load_dataset(name: str):
    """A `DatasetDict` from a folder of <split>.parquet files, one .parquet file or a Hub id, or a `CliError`."""
    from datasets import DatasetDict

    from .data.images import load_image_dataset

    if not Path(name).exists() and _looks_like_local_path(name):
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


def _pick_split(dataset, name: str, split: str, flag: str = "--split"):
    if split not in dataset:
        available = ", ".join(sorted(dataset))
        raise CliError(
            f"The dataset {name} has no split {split!r}; available splits: {available}. Pass one of them with {flag}."
        )
    return dataset[split]


def _load_split(name: str, split: str):
    return _pick_split(_load_dataset(name), name, split)


def _label_column(split) -> str:
    from .data.images import LABEL_COLUMNS, find_column

    try:
        return find_column(split.column_names, LABEL_COLUMNS, "label")
    except ValueError as err:
        raise CliError(f"{err} Image classification needs an integer label column.") from err


def _label_count(split) -> int:
    """Classes of a split's label column: its ClassLabel size, else the largest label + 1."""
    column = _label_column(split)
    return getattr(split.features[column], "num_classes", None) or int(max(split[column])) + 1


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

    from .data.images import prepare_image_dataset, strided_subset
    from .metrics import top1_accuracy

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


# --------------------------------------------------------------------------------------------------------- train


@dataclass
class TrainCliArguments:
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


TRAIN_DATACLASSES = (TrainCliArguments, HKTTrainingArguments)
# Defaults of `hkt-hf train` that differ from TrainingArguments': image transforms need the raw image column.
TRAIN_DEFAULTS = {"remove_unused_columns": False, "output_dir": "hkt-child"}


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="a YAML or JSON file whose keys are the "
                        "flags below without dashes; flags given on the command line override it")
    parser.add_argument("--config", dest="config_flag", metavar="CONFIG", help="the same, as an option")
    # HfArgumentParser makes one flag per dataclass field; argparse copies them in as it does for `parents=`.
    parser._add_container_actions(HfArgumentParser(TRAIN_DATACLASSES, add_help=False))
    parser.set_defaults(**TRAIN_DEFAULTS)
    parser.usage = (f"{PROG} train [CONFIG] --child CHILD --parent PARENT --dataset DATASET [--output_dir DIR] "
                    "[any TrainingArguments / HKT flag ...]")


def _read_config(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CliError(f"No config file at {path}. Pass a YAML (.yaml/.yml) or JSON (.json) file.")
    try:
        values = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CliError(f"{path} is not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(values, dict):
        raise CliError(f"{path} must hold a mapping of option names to values, e.g. `learning_rate: 0.01`.")
    known = {f.name for cls in TRAIN_DATACLASSES for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1)) else key
                 for key in unknown]
        raise CliError(f"{path} has unknown keys: {', '.join(hints)}. Keys are the flag names of "
                       f"`{PROG} train --help` without the leading dashes.")
    return values


def _train_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The command line on top of the config file: the file's values become defaults, flags override them."""
    if args.config_file and args.config_flag:
        raise CliError("Give the config file once: either as CONFIG or with --config.")
    config = args.config_file or args.config_flag
    if not config:
        return args
    parser = command_parser(SUBCOMMANDS["train"])
    parser.set_defaults(**_read_config(config))
    return parser.parse_args(args.command_argv)


def _dataclass_from(cls: type, namespace: argparse.Namespace):
    values = {f.name: getattr(namespace, f.name) for f in fields(cls) if f.init and hasattr(namespace, f.name)}
    try:
        return cls(**values)
    except ValueError as err:
        raise CliError(f"{err} (see `{PROG} train --help`)") from err


@subcommand(
    "train",
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
    arguments=_train_arguments,
)
def train_command(args: argparse.Namespace) -> int:
    from datasets import DatasetDict

    from .data.images import image_collator, prepare_image_dataset, strided_subset
    from .metrics import top1_accuracy
    from .trainer import HKTTrainer

    namespace = _train_namespace(args)
    data = _dataclass_from(TrainCliArguments, namespace)
    if data.parent and namespace.hkt_parent and data.parent != namespace.hkt_parent:
        raise CliError(f"--parent {data.parent} and --hkt_parent {namespace.hkt_parent} disagree; give only one.")
    namespace.hkt_parent = data.parent or namespace.hkt_parent
    missing = [flag for flag, value in (("--child", data.child), ("--parent", namespace.hkt_parent),
                                        ("--dataset", data.dataset)) if not value]
    if missing:
        raise CliError(f"Missing {', '.join(missing)}. `{PROG} train` needs a child, a parent and a dataset "
                       f"(flags or config-file keys); see `{PROG} train --help`.")
    if namespace.remove_unused_columns:
        raise CliError("--remove_unused_columns True drops the image column the on-the-fly transforms need; "
                       "leave it at its default (False).")
    training_args = _dataclass_from(HKTTrainingArguments, namespace)

    child = _load_model(data.child)
    parent = _load_model(namespace.hkt_parent)
    processor = _load_processor(data.child)
    dataset = _load_dataset(data.dataset)
    splits = DatasetDict({
        data.train_split: strided_subset(_pick_split(dataset, data.dataset, data.train_split, "--train_split"),
                                         data.max_train_samples),
        data.eval_split: strided_subset(_pick_split(dataset, data.dataset, data.eval_split, "--eval_split"),
                                        data.max_eval_samples),
    })
    labels = _label_count(splits[data.train_split])
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


# ---------------------------------------------------------------------------------------------------------- push


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="a child saved by `hkt-hf train` or trainer.save_model()")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. your-name/hkt-resnet20 "
                        "(created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` stored)")
    parser.add_argument("--dataset", default=None, help="dataset id to name in the model card")
    parser.add_argument("--license", default=None, help="license id for the model card, e.g. apache-2.0")
    parser.add_argument("--commit-message", default="Upload HKT child", help="(default: %(default)s)")


def _saved_metrics(folder: Path) -> dict[str, dict[str, float]]:
    """Child and parent metrics `hkt-hf train` saved in eval_results.json, for the model card."""
    path = folder / "eval_results.json"
    if not path.is_file():
        return {}
    metrics = {k.removeprefix("eval_"): v for k, v in json.loads(path.read_text()).items()
               if isinstance(v, (int, float))}
    return {
        "child_metrics": {k: v for k, v in metrics.items() if not k.startswith("parent_")},
        "parent_metrics": {k.removeprefix("parent_"): v for k, v in metrics.items() if k.startswith("parent_")},
    }


@subcommand(
    "push",
    summary="share a trained child on the Hugging Face Hub, with an HKT model card",
    description="""
Upload a saved child to the Hugging Face Hub: weights, config, image processor or tokenizer, hkt_config.json and a
model card naming the parent, the HKT settings and the measured top-1 of child and parent (from the folder's
eval_results.json, written by `hkt-hf train`). Checkpoints, optimizer states and the training-only aligners and
gates stay local. Log in first with `hf auth login` (or pass --token).""",
    examples="""
examples:
  hkt-hf push hkt-resnet20 your-name/hkt-resnet20 --dataset uoft-cs/cifar10 --license apache-2.0
  hkt-hf push hkt-resnet20 your-org/hkt-resnet20 --private --revision experiments""",
    arguments=_push_arguments,
)
def push_command(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from .hub import push_child

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"No folder at {folder}. Pass the output folder of `{PROG} train` (its --output_dir).")
    try:
        info = push_child(folder, args.repo_id, token=args.token, private=args.private or None,
                          revision=args.revision, commit_message=args.commit_message, dataset=args.dataset,
                          license=args.license, **_saved_metrics(folder))
    except (FileNotFoundError, ValueError) as err:  # not a plain child folder, or a malformed repo id
        hint = " Repository ids look like your-name/model-name." if isinstance(err, HFValidationError) else ""
        raise CliError(f"{err}{hint}") from err
    except (HfHubHTTPError, OSError) as err:  # refused by the Hub, bad token, no connection
        raise CliError(f"The Hub refused or could not be reached: {type(err).__name__}: {err}\n"
                       "Check your connection and token (`hf auth login`, or --token).") from err
    print(f"Pushed {folder} to {info.commit_url}")
    return 0


# ---------------------------------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="hkt-demo", help="where the plot, table and runs go "
                        "(default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="child seeds (initial weights and data order); the parent is trained once, with the "
                        "first (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs of every run (default: 12)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch; one is fastest for "
                        "the tiny digits models, even on a busy machine (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    hub = parser.add_argument_group("your own data and models (instead of the bundled digits)")
    hub.add_argument("--dataset", metavar="DIR_OR_HUB_ID_OR_PARQUET", help="an image-classification dataset with "
                     "image and label columns: a folder of <split>.parquet files, a .parquet file or a Hub id")
    hub.add_argument("--parent", metavar="DIR_OR_HUB_ID", help="an already trained parent (used frozen, not "
                     "trained); default: train a CIFAR ResNet-14 parent first")
    hub.add_argument("--child", metavar="DIR_OR_HUB_ID", help="the starting child of the three child runs; default: "
                     "a fresh CIFAR ResNet-8 (widths 4/8/16)")
    hub.add_argument("--train-split", default="train", help="(default: %(default)s)")
    hub.add_argument("--test-split", default="test", help="(default: %(default)s)")
    hub.add_argument("--max-train-samples", type=positive_int, default=5000, help="strided rows of the training "
                     "split (default: %(default)s)")
    hub.add_argument("--max-test-samples", type=positive_int, default=1000, help="(default: %(default)s)")


def _demo_task(args: argparse.Namespace):
    """The digits task, or one built from --dataset / --parent / --child."""
    from datasets import DatasetDict

    from .data.images import prepare_image_dataset, strided_subset
    from .demo import cifar_resnet, digits_task
    from .models import cifar_image_processor

    if not args.dataset:
        if args.parent or args.child:
            raise CliError("--parent and --child need --dataset: the bundled digits are 8x8 grey images with 10 "
                           "classes, which models trained elsewhere do not fit.")
        try:
            return digits_task()
        except ImportError as err:
            raise CliError(str(err)) from err
    from .demo import DemoTask

    dataset = _load_dataset(args.dataset)
    splits = DatasetDict({
        "train": strided_subset(_pick_split(dataset, args.dataset, args.train_split, "--train-split"),
                                args.max_train_samples),
        "test": strided_subset(_pick_split(dataset, args.dataset, args.test_split, "--test-split"),
                               args.max_test_samples),
    })
    labels = _label_count(splits["train"])
    parent = _load_model(args.parent) if args.parent else None
    # Built-in models get the parent's label names (HKT checks that they match), else the dataset's.
    names = getattr(splits["train"].features[_label_column(splits["train"])], "names", None)
    id2label = dict(parent.config.id2label) if parent is not None else dict(enumerate(names or map(str, range(labels))))
    source = args.child or args.parent
    processor = _load_processor(source) if source else cifar_image_processor()
    if args.child:
        _load_model(args.child)  # fail now, with the CLI's message, rather than in the middle of the runs
        make_child = lambda seed: _load_model(args.child)  # noqa: E731
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
        name=f"{args.dataset} ({len(splits['train'])} train / {len(splits['test'])} test images)",
        train=prepared["train"], test=prepared["test"], make_child=make_child, parent=parent,
        make_parent=None if parent is not None else (lambda seed: cifar_resnet(14, (16, 32, 64), labels, 3, seed,
                                                                               id2label)),
    )


@subcommand(
    "demo",
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
    arguments=_demo_arguments,
)
def demo_command(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from .demo import DemoRecipe, format_table, plot_report, run_demo

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # the runs' own logs are summarised in the table
    task = _demo_task(args)
    recipe = DemoRecipe() if args.epochs is None else DemoRecipe(epochs=args.epochs)
    print(f"HKT demo on {task.name}: parent, then child alone, KD and HKT for seed(s) "
          f"{', '.join(map(str, args.seeds))}")
    try:
        report = run_demo(task, args.output_dir, seeds=args.seeds, recipe=recipe, progress=not args.no_progress)
    except (ValueError, TypeError) as err:  # e.g. a parent and child HKT cannot pair
        raise CliError(str(err)) from err
    table = format_table(report)
    out = Path(args.output_dir)
    (out / "demo.txt").write_text(table + "\n")
    plot = plot_report(report, out / "demo.png")
    print()
    print(table)
    print(f"Wrote {plot} and {out / 'demo.txt'}.")
    return 0


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hereditary Knowledge Transfer (HKT) for Hugging Face transformers: train a small child model "
        "with the knowledge of a frozen larger parent, evaluate it, share it. New here? Run `hkt-hf demo`.",
        epilog=f"Run `{PROG} COMMAND --help` for the options and examples of one command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in SUBCOMMANDS.values():
        command_parser(cmd, commands.add_parser, help=cmd.summary)
    return parser


def command_parser(cmd: Subcommand, add_parser: Callable[..., argparse.ArgumentParser] | None = None,
                   **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of one subcommand: a subparser when `add_parser` (a subparsers' method) is given, else standalone."""
    options = dict(description=cmd.description, epilog=cmd.examples,
                   formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    if add_parser is None:
        parser = argparse.ArgumentParser(prog=f"{PROG} {cmd.name}", **options)
    else:
        parser = add_parser(cmd.name, **options)
    cmd.arguments(parser)
    parser.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hkt-hf`; returns the exit code (0 success, 2 wrong usage or input)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_argv = argv[argv.index(args.command) + 1 :]  # for `train` to re-read over a config file
    try:
        return args.run(args)
    except CliError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
