#!/usr/bin/env python
# HKT version of transformers' examples/pytorch/language-modeling/run_clm.py (causal language modelling).
#
# It differs from the plain-Trainer script ONLY by the two-name swap
#     -from transformers import Trainer, TrainingArguments
#     +from hkt_hf import HKTTrainer, HKTTrainingArguments
# and the parent, `--hkt_parent path-or-hub-id`, an HKTTrainingArguments field (so are the other --hkt_* flags).
# Everything else is the official recipe; the accuracy metric is computed locally (local_metrics.py), offline.
"""Fine-tune a small causal LM (the child) on a text corpus while a larger one (the parent) passes it knowledge.

    python examples/official/run_clm.py \
        --model_name_or_path small-gpt2 --hkt_parent big-gpt2-same-tokenizer \
        --train_file train.txt --validation_file valid.txt --block_size 128 \
        --do_train --do_eval --output_dir /tmp/hkt-clm

The parent must share the child's tokenizer (vocabulary). `--dataset_name` takes a Hub id or a local dataset folder
instead of the files; train from scratch with `--config_name ... --tokenizer_name ...` and no `--model_name_or_path`.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import torch
import transformers
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments
from local_metrics import accuracy

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (the child)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to start from; leave unset to train from scratch (--config_name)."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name (Hub id or local folder)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a text, json or csv file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data: text, json or csv."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    block_size: int | None = field(
        default=None, metadata={"help": "Length of the training blocks (default: the model maximum, at most 1024)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the train split used for validation when there is no validation split."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading text files."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Need either --dataset_name or --train_file / --validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "txt"):
                raise ValueError(f"{path}: --train_file / --validation_file must be a csv, json or txt file.")


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                           token=model_args.token)
    else:
        data_files = {split: path for split, path in (("train", data_args.train_file),
                                                      ("validation", data_args.validation_file)) if path}
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        builder_kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if extension == "txt" else {}
        raw = load_dataset("text" if extension == "txt" else extension, data_files=data_files,
                           cache_dir=model_args.cache_dir, token=model_args.token, **builder_kwargs)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


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

    raw_datasets = load_raw_datasets(data_args, model_args, training_args.seed)

    hub_kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                                  "token": model_args.token, "trust_remote_code": model_args.trust_remote_code}
    config_source = model_args.config_name or model_args.model_name_or_path
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if config_source is None or tokenizer_source is None:
        raise ValueError("Give --model_name_or_path, or --config_name and --tokenizer_name to train from scratch.")
    config = AutoConfig.from_pretrained(config_source, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **hub_kwargs)
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config, **hub_kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"Training a new model from scratch: {model.num_parameters() / 2**20:.2f}M parameters")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    column_names = list(raw_datasets["train" if training_args.do_train else "validation"].features)
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples: dict[str, list]) -> dict[str, list]:
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(
            tokenize_function, batched=True, num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names, load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    max_length = tokenizer.model_max_length
    if data_args.block_size is None:
        block_size = min(max_length, 1024)
    else:
        if data_args.block_size > max_length:
            logger.warning(f"--block_size {data_args.block_size} exceeds the model maximum {max_length}; using it.")
        block_size = min(data_args.block_size, max_length)

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        """Concatenate all texts and cut them into blocks of `block_size` (the remainder is dropped)."""
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated["input_ids"]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(
            group_texts, batched=True, num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache, desc=f"Grouping texts in chunks of {block_size}",
        )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    def preprocess_logits_for_metrics(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
        """Keep only the argmax of the logits, so evaluation does not gather the whole vocabulary per token."""
        if isinstance(logits, tuple):  # extra outputs such as past_key_values
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds: EvalPrediction) -> dict[str, float]:
        preds, labels = eval_preds
        # The prediction at position i is for the token at i + 1.
        return accuracy(preds[:, :-1].reshape(-1), labels[:, 1:].reshape(-1))

    trainer = HKTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
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
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            metrics["perplexity"] = math.exp(metrics["eval_loss"])
        except OverflowError:
            metrics["perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
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
