"""`hkt-hf evaluate`: top-1 accuracy of an image-classification model on one split of a dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .common import CliError, Command, PositiveInt, load_model, load_processor, load_split


@dataclass
class EvaluateOptions:
    model: str = field(metadata={"metavar": "DIR_OR_HUB_ID", "help": "a save_pretrained folder (e.g. from "
                                 "import-checkpoint) or a Hub model id"})
    dataset: str = field(metadata={"metavar": "DIR_OR_HUB_ID_OR_PARQUET", "help": "a folder of <split>.parquet "
                                   "files, one .parquet file (its split is the file name), or a Hub dataset id; "
                                   "columns as in uoft-cs/cifar10 (img/image, label/labels)"})
    split: str = field(default="test", metadata={"help": "split to evaluate on"})
    batch_size: PositiveInt = field(default=256, metadata={"help": "images per forward pass"})
    limit: PositiveInt | None = field(default=None, metadata={
        "metavar": "N", "help": "evaluate on N rows spread evenly over the split (a strided subset, so label-sorted "
        "data stays balanced) instead of all of it"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu, cuda, cuda:1, mps"})
    json: bool = field(default=False, metadata={"help": "print one JSON line instead of a sentence"})
    no_progress: bool = field(default=False, metadata={"help": "hide the progress bar"})


def run(options: EvaluateOptions) -> int:
    import torch
    from datasets import DatasetDict

    from ..data.images import prepare_image_dataset, strided_subset
    from ..metrics import top1_accuracy

    try:
        device = torch.device(options.device)
    except RuntimeError as err:
        raise CliError(f"Unknown --device {options.device!r}: {err}. Use e.g. cpu or cuda.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {options.device} was asked for, but CUDA is not available here. Use --device cpu.")

    model = load_model(options.model)
    processor = load_processor(options.model)
    split = strided_subset(load_split(options.dataset, options.split), options.limit)
    try:
        # train_split=None: no split gets the training augmentation, whatever its name.
        prepared = prepare_image_dataset(
            DatasetDict({options.split: split}), processor, train_split=None,
            num_channels=getattr(model.config, "num_channels", 3),
        )[options.split]
    except ValueError as err:
        raise CliError(f"{err} Evaluate needs an image column and an integer label column.") from err

    accuracy = top1_accuracy(model, prepared, batch_size=options.batch_size, device=device,
                             progress=not options.no_progress)
    if options.json:
        print(json.dumps({
            "model": options.model,
            "dataset": options.dataset,
            "split": options.split,
            "num_images": len(prepared),
            "top1_accuracy": accuracy,
        }))
    else:
        print(f"top-1 accuracy: {accuracy:.2f} % on {len(prepared)} images")
    return 0


COMMAND = Command(
    name="evaluate",
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
    options=(EvaluateOptions,),
    run=run,
)
