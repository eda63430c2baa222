#!/usr/bin/env python
# HKT version of transformers' examples/pytorch/summarization/run_summarization.py (sequence to sequence).
#
# It differs from the plain-Trainer script ONLY by the two-name swap
#     -from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
#     +from hkt_hf import HKTSeq2SeqTrainer, HKTSeq2SeqTrainingArguments
# and the parent, `--hkt_parent path-or-hub-id`, an HKTSeq2SeqTrainingArguments field (so are the other --hkt_*
# flags). Everything else is the official recipe, except the metric: `evaluate.load("rouge")` needs the Hub, so
# ROUGE-1/2 F1 are computed locally (local_metrics.py), on whitespace tokens without stemming.
"""Fine-tune a small sequence-to-sequence model (the child) for summarization while a larger one (the parent) passes
it knowledge.

    python examples/official/run_summarization.py \
        --model_name_or_path small-t5 --hkt_parent big-t5-same-tokenizer \
        --train_file train.json --validation_file valid.json --text_column text --summary_column summary \
        --source_prefix "summarize: " --predict_with_generate \
        --do_train --do_eval --output_dir /tmp/hkt-summarization

The parent must share the child's tokenizer (vocabulary). With `--predict_with_generate`, evaluation generates
summaries and reports ROUGE and their mean length (`gen_len`).
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
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    HfArgumentParser,
    set_seed,
)

from hkt_hf import HKTSeq2SeqTrainer, HKTSeq2SeqTrainingArguments
from local_metrics import rouge

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


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, and how long inputs and summaries may be."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name (Hub id or local folder)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a csv or json file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data: a csv or json file."})
    text_column: str | None = field(default=None, metadata={"help": "Column of the texts (default: the first)."})
    summary_column: str | None = field(default=None, metadata={"help": "Column of the summaries (default: second)."})
    max_source_length: int = field(default=1024, metadata={"help": "Longer inputs are truncated."})
    max_target_length: int = field(default=128, metadata={"help": "Longer training summaries are truncated."})
    val_max_target_length: int | None = field(
        default=None,
        metadata={"help": "Longest evaluation summary, and the default generation_max_length (default: "
                          "max_target_length)."},
    )
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad to the maximum length, not per batch."})
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Leave padded labels out of the loss."})
    source_prefix: str = field(default="", metadata={"help": "Prefix of every input, e.g. 'summarize: ' for T5."})
    num_beams: int | None = field(default=None, metadata={"help": "Beams for evaluation (generation_num_beams)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached preprocessed datasets."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            raise ValueError("Need either --dataset_name or --train_file / --validation_file.")
        for path in (self.train_file, self.validation_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json"):
                raise ValueError(f"{path}: --train_file / --validation_file must be a csv or json file.")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, HKTSeq2SeqTrainingArguments))
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
        data_files = {split: path for split, path in (("train", data_args.train_file),
                                                      ("validation", data_args.validation_file)) if path}
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        raw_datasets = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir,
                                    token=model_args.token)

    hub_kwargs: dict[str, Any] = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
                                  "token": model_args.token, "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub_kwargs)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config, **hub_kwargs)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.decoder_start_token_id is None:
        raise ValueError("The model's config needs a decoder_start_token_id.")

    column_names = raw_datasets["train" if training_args.do_train else "validation"].column_names
    text_column = data_args.text_column or column_names[0]
    summary_column = data_args.summary_column or column_names[1]
    for name in (text_column, summary_column):
        if name not in column_names:
            raise ValueError(f"Column {name!r} is not in the dataset; its columns: {column_names}.")
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples: dict[str, list], max_target_length: int) -> dict[str, list]:
        pairs = [(t, s) for t, s in zip(examples[text_column], examples[summary_column]) if t and s]
        inputs = [data_args.source_prefix + text for text, _ in pairs]
        model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, padding=padding, truncation=True)
        labels = tokenizer(text_target=[summary for _, summary in pairs], max_length=max_target_length,
                           padding=padding, truncation=True)["input_ids"]
        if padding == "max_length" and data_args.ignore_pad_token_for_loss:
            labels = [[t if t != tokenizer.pad_token_id else -100 for t in label] for label in labels]
        model_inputs["labels"] = labels
        return model_inputs

    def prepare(split: str, max_samples: int | None, max_target_length: int) -> datasets.Dataset:
        dataset = raw_datasets[split]
        if max_samples is not None:
            dataset = dataset.select(range(min(len(dataset), max_samples)))
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            return dataset.map(
                preprocess, fn_kwargs={"max_target_length": max_target_length}, batched=True,
                num_proc=data_args.preprocessing_num_workers, remove_columns=column_names,
                load_from_cache_file=not data_args.overwrite_cache, desc=f"Running tokenizer on the {split} split",
            )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = prepare("train", data_args.max_train_samples, data_args.max_target_length)
    if training_args.do_eval:
        eval_dataset = prepare("validation", data_args.max_eval_samples, data_args.val_max_target_length)

    label_pad_token_id = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    mixed_precision = training_args.fp16 or training_args.bf16
    data_collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=label_pad_token_id,
                                           pad_to_multiple_of=8 if mixed_precision else None)

    def compute_metrics(eval_preds: EvalPrediction) -> dict[str, float]:
        preds, labels = eval_preds
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded_preds = [text.strip() for text in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        decoded_labels = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        result = {key: round(value * 100, 4) for key, value in rouge(decoded_preds, decoded_labels).items()}
        result["gen_len"] = float(np.mean([np.count_nonzero(pred != tokenizer.pad_token_id) for pred in preds]))
        return result

    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.val_max_target_length
    if data_args.num_beams is not None:
        training_args.generation_num_beams = data_args.num_beams

    trainer = HKTSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
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
        metrics = trainer.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "tasks": "summarization"}
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
