"""Image classification with HKT: transformers' `examples/pytorch/image-classification/run_image_classification.py`,
shortened, with the two-name swap that turns a fine-tuning script into an HKT one:

    -from transformers import Trainer, TrainingArguments
    +from hkt_hf import HKTTrainer as Trainer, HKTTrainingArguments as TrainingArguments
     ...
    -    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    +    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))  # now has --hkt_*
    ...
     python run_image_classification.py --model_name_or_path small-model \
    +    --hkt_parent big-model-finetuned-on-the-same-labels \
         --dataset_name ... --remove_unused_columns False --do_train --do_eval

Everything else (arguments, transforms, metrics, evaluation, saving) is the stock script's. `--quick` builds a tiny
ViT parent (trained briefly first) and a tinier ViT child from configs, offline, for CI.

    python examples/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --hkt_parent your-name/vit-large-cifar10 --dataset_name uoft-cs/cifar10 --output_dir vit-hkt \
        --do_train --do_eval --num_train_epochs 3 --learning_rate 5e-5 --per_device_train_batch_size 32
    python examples/image_classification.py --quick --dataset_name data/cifar10 --output_dir /tmp/vit-quick
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    Trainer as PlainTrainer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    set_seed,
)

from hkt_hf import HKTTrainer as Trainer
from hkt_hf import HKTTrainingArguments as TrainingArguments
from hkt_hf.apps.data.images import image_collator, load_image_dataset, prepare_image_dataset, strided_subset


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "the child: a checkpoint or Hub id"})
    quick: bool = field(default=False, metadata={"help": "tiny ViTs from configs, a few steps (CI, offline)"})


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(metadata={"help": "Hub id, folder of <split>.parquet files, or one .parquet file"})
    train_split: str = field(default="train")
    eval_split: str = field(default="test")
    max_train_samples: int | None = field(default=None, metadata={"help": "strided subset for quick runs"})
    max_eval_samples: int | None = field(default=None)


QUICK = dict(max_train_samples=64, max_eval_samples=32, max_steps=4, per_device_train_batch_size=16,
             learning_rate=1e-3, do_train=True, do_eval=True, report_to="none", save_strategy="no", use_cpu=True)


def tiny_vit(hidden: int, labels: dict[int, str], seed: int) -> ViTForImageClassification:
    set_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=hidden, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=2 * hidden, num_labels=len(labels), id2label=labels)
    return ViTForImageClassification(config)


def compute_metrics(p: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    parser.set_defaults(remove_unused_columns=False)  # the transforms need the raw image column
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        parser.set_defaults(**QUICK)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    dataset = load_image_dataset(data_args.dataset_name)
    dataset = {"train": strided_subset(dataset[data_args.train_split], data_args.max_train_samples),
               "eval": strided_subset(dataset[data_args.eval_split], data_args.max_eval_samples)}
    names = dataset["train"].features[[c for c in ("label", "labels") if c in dataset["train"].column_names][0]].names
    labels = dict(enumerate(names))

    if model_args.quick:
        processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
        model = tiny_vit(16, labels, seed=1)
        parent = tiny_vit(64, labels, seed=0)  # a stand-in for a fine-tuned large model: train it a little first
    else:
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(labels), id2label=labels)
        model = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                                ignore_mismatched_sizes=True)
        parent = None  # loaded by the trainer from --hkt_parent
    data = prepare_image_dataset(DatasetDict(dataset), processor)

    if model_args.quick:
        warmup_args = TrainingArguments(output_dir=f"{training_args.output_dir}/parent", max_steps=10,
                                        learning_rate=1e-3, per_device_train_batch_size=16, report_to="none",
                                        save_strategy="no", remove_unused_columns=False, use_cpu=True)
        PlainTrainer(parent, warmup_args, train_dataset=data["train"], data_collator=image_collator()).train()

    trainer = Trainer(model=model, args=training_args, parent_model=parent,
                      train_dataset=data["train"] if training_args.do_train else None,
                      eval_dataset=data["eval"] if training_args.do_eval else None,
                      compute_metrics=compute_metrics, processing_class=processor, data_collator=image_collator())
    metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


if __name__ == "__main__":
    main()
