#!/usr/bin/env python
# HKT version of transformers' examples/pytorch/text-classification/run_classification.py (single-label text
# classification).
#
# It differs from the plain-Trainer script ONLY by the two-name swap
#     -from transformers import Trainer, TrainingArguments
#     +from hkt_hf import HKTTrainer, HKTTrainingArguments
# and the parent, `--hkt_parent path-or-hub-id`, an HKTTrainingArguments field (so are the other --hkt_* flags).
# Everything else is the official recipe; the accuracy metric is computed locally (local_metrics.py), offline.
"""Fine-tune a small text classifier (the child) while a larger one trained on the same labels (the parent) passes
it knowledge.

    python examples/official/run_classification.py \
        --model_name_or_path small-bert --hkt_parent big-bert-finetuned-on-these-labels \
        --train_file train.csv --validation_file valid.csv --text_column_names sentence --label_column_name label \
        --do_train --do_eval --output_dir /tmp/hkt-classification

The labels are read from the data (sorted); the parent must use the same ones (same `id2label`). Batches are padded
per batch (`DataCollatorWithPadding`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    set_seed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments
from local_metrics import accuracy

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (the child)."""

    model_name_or_path: str = field(metadata={"help": "Checkpoint to start from (Hub id or local folder)."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
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
    train_file: str | None = field(default=None, metadata={"help": "Training data: a csv or json file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data: a csv or json file."})
    text_column_names: str = field(
        default="sentence", metadata={"help": "Comma-separated text column(s); several are joined with a space."}
    )
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and (self.train_file is None or self.validation_file is None):
            raise ValueError("Need either --dataset_name or both --train_file and --validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json"):
                raise ValueError(f"{path}: --train_file / --validation_file must be a csv or json file.")


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
        raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                    cache_dir=model_args.cache_dir, token=model_args.token)
    else:
        data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
        extension = data_args.train_file.rsplit(".", 1)[-1]
        raw_datasets = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir,
                                    token=model_args.token)

    # The labels as the data has them (strings or numbers), sorted; the model predicts their index.
    label_column = data_args.label_column_name
    label_list = sorted(set(raw_datasets["train"][label_column]) | set(raw_datasets["validation"][label_column]))
    label_to_id = {label: i for i, label in enumerate(label_list)}

    hub_kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                                  "token": model_args.token, "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, num_labels=len(label_list),
        finetuning_task="text-classification", **hub_kwargs,
    )
    config.problem_type = "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub_kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    model.config.label2id = {str(label): i for label, i in label_to_id.items()}
    model.config.id2label = {i: str(label) for label, i in label_to_id.items()}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(f"--max_seq_length {data_args.max_seq_length} exceeds the model maximum; using "
                       f"{tokenizer.model_max_length}.")
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    text_columns = [name.strip() for name in data_args.text_column_names.split(",")]

    def preprocess_function(examples: dict[str, list]) -> dict[str, list]:
        texts = [" ".join(parts) for parts in zip(*(examples[c] for c in text_columns))]
        result = tokenizer(texts, max_length=max_seq_length, truncation=True)  # padded per batch by the collator
        result["labels"] = [label_to_id[label] for label in examples[label_column]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function, batched=True, num_proc=data_args.preprocessing_num_workers,
            remove_columns=raw_datasets["train"].column_names, load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_dataset = raw_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return accuracy(np.argmax(logits, axis=1), p.label_ids)

    mixed_precision = training_args.fp16 or training_args.bf16
    trainer = HKTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if mixed_precision else None),
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # saves the tokenizer too
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
