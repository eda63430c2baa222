#!/usr/bin/env python
# HKT version of transformers' examples/pytorch/image-classification/run_image_classification.py.
#
# It differs from the plain-Trainer script ONLY by the two-name swap
#     -from transformers import Trainer, TrainingArguments
#     +from hkt_hf import HKTTrainer, HKTTrainingArguments
# and the parent, `--hkt_parent path-or-hub-id`, an HKTTrainingArguments field (so are the other --hkt_* flags).
# Everything else is the official recipe, except two offline-friendly choices: the accuracy metric is computed
# locally (local_metrics.py), and the transforms are the image processor's (plus a random flip while training)
# instead of torchvision's.
"""Fine-tune a small image classifier (the child) while a larger one trained on the same labels (the parent) passes
it knowledge.

    python examples/official/run_image_classification.py \
        --model_name_or_path small-vit --hkt_parent big-vit-finetuned-on-these-labels \
        --train_dir images/train --validation_dir images/validation \
        --do_train --do_eval --remove_unused_columns False --output_dir /tmp/hkt-images

`--train_dir` / `--validation_dir` are `imagefolder` layouts (one sub-folder per class); `--dataset_name` takes a Hub
id or a local dataset folder (e.g. `train.parquet` / `validation.parquet` with `image` and `label` columns) instead.
Keep `--remove_unused_columns False`: the transforms need the image column.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from PIL import ImageOps
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    set_seed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments
from local_metrics import accuracy

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model, config and image processor to fine-tune (the child)."""

    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k", metadata={"help": "Checkpoint to start from (Hub id or folder)."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a pretrained head whose number of labels differs."}
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name (Hub id or local folder)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, one folder per class."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels (a ClassLabel)."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of train held out for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("Need either --dataset_name or --train_dir / --validation_dir.")


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, HKTTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)

    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                               token=model_args.token)
    else:
        data_files = {split: os.path.join(folder, "**") for split, folder in
                      (("train", data_args.train_dir), ("validation", data_args.validation_dir)) if folder}
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)

    column_names = dataset["train" if "train" in dataset else "validation"].column_names
    for name, flag in ((data_args.image_column_name, "--image_column_name"),
                       (data_args.label_column_name, "--label_column_name")):
        if name not in column_names:
            raise ValueError(f"{flag} {name!r} is not a column of the dataset; its columns: {column_names}.")

    if "validation" not in dataset and data_args.train_val_split > 0.0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]

    # As the official script builds them: the class names, ids as strings.
    labels = dataset["train"].features[data_args.label_column_name].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        return accuracy(np.argmax(p.predictions, axis=1), p.label_ids)

    hub_kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                                  "token": model_args.token, "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, num_labels=len(labels), label2id=label2id,
        id2label=id2label, finetuning_task="image-classification", **hub_kwargs,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
    )

    def pixel_values(images: list, flip: bool) -> list[torch.Tensor]:
        """The processor's resize / rescale / normalise; while training, each image is flipped with probability 1/2."""
        images = [image.convert("RGB") for image in images]
        if flip:
            images = [ImageOps.mirror(image) if random.random() < 0.5 else image for image in images]
        return list(image_processor(images, return_tensors="pt")["pixel_values"])

    def train_transforms(example_batch: dict[str, list]) -> dict[str, list]:
        example_batch["pixel_values"] = pixel_values(example_batch[data_args.image_column_name], flip=True)
        return example_batch

    def val_transforms(example_batch: dict[str, list]) -> dict[str, list]:
        example_batch["pixel_values"] = pixel_values(example_batch[data_args.image_column_name], flip=False)
        return example_batch

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example[data_args.label_column_name] for example in examples]),
        }

    def subset(split: str, max_samples: int | None) -> datasets.Dataset:
        """A shuffled subset of at most `max_samples` rows (the whole split if None)."""
        if max_samples is None:
            return dataset[split]
        return dataset[split].shuffle(seed=training_args.seed).select(range(min(len(dataset[split]), max_samples)))

    if training_args.do_train:
        dataset["train"] = subset("train", data_args.max_train_samples)
        dataset["train"].set_transform(train_transforms)
    if training_args.do_eval:
        dataset["validation"] = subset("validation", data_args.max_eval_samples)
        dataset["validation"].set_transform(val_transforms)

    trainer = HKTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # saves the image processor too
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs: dict[str, Any] = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name,
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
