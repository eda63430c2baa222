"""Text classification with HKT: a small BERT child learns from a larger fine-tuned BERT parent.

The script is a typical transformers fine-tuning script with the two-name swap (`HKTTrainer`, `HKTTrainingArguments`)
and `--hkt_parent`. The default carrier (`auto`) is the input of each classification head: BERT's pooled [CLS]
feature, aligned by a small linear map when the widths differ.

    python examples/text_classification.py --model_name_or_path prajjwal1/bert-tiny \
        --hkt_parent textattack/bert-base-uncased-SST-2 --dataset_name stanfordnlp/sst2 --text_column sentence \
        --output_dir bert-tiny-hkt --num_train_epochs 3 --learning_rate 5e-5
    # CI, offline: tiny BERTs from configs, a word-level tokenizer built on the fly, a synthetic sentiment task
    python examples/text_classification.py --quick --output_dir /tmp/bert-quick
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    set_seed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments

POSITIVE, NEGATIVE = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "terrible"]
NEUTRAL = ["the", "movie", "was", "a", "plot", "film", "very", "quite", "and", "story"]


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "the child: a checkpoint or Hub id"})
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub id with train/validation splits"})
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    eval_split: str = field(default="validation")
    quick: bool = field(default=False, metadata={"help": "tiny BERTs, offline tokenizer and synthetic data (CI)"})


QUICK = dict(num_train_epochs=10, per_device_train_batch_size=32, learning_rate=2e-3, report_to="none",
             save_strategy="no", use_cpu=True, logging_steps=5)


def synthetic_sentiment(n: int, seed: int) -> Dataset:
    """Neutral words plus one or two sentiment words; label 1 = positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(NEUTRAL, size=rng.integers(3, 7)))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if i % 2 else NEGATIVE)))
        rows.append({"text": " ".join(words), "label": i % 2})
    return Dataset.from_list(rows)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the synthetic vocabulary, built without any download."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + POSITIVE + NEGATIVE + NEUTRAL)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]",
                                            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def tiny_bert(hidden: int, layers: int, vocab_size: int, seed: int) -> BertForSequenceClassification:
    set_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2))


def accuracy(p: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, HKTTrainingArguments))
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        parser.set_defaults(**QUICK)
    script, args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(args.seed)

    if script.quick:
        tokenizer = word_tokenizer()
        raw = DatasetDict(train=synthetic_sentiment(256, seed=0), validation=synthetic_sentiment(64, seed=1))
        child = tiny_bert(32, 1, len(tokenizer), seed=1)
        parent = tiny_bert(48, 2, len(tokenizer), seed=0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        raw = load_dataset(script.dataset_name)
        child = AutoModelForSequenceClassification.from_pretrained(script.model_name_or_path, num_labels=2)
        parent = None  # the trainer loads --hkt_parent

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[script.text_column], truncation=True, max_length=32)
        encoded["labels"] = batch[script.label_column]
        return encoded

    data = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
    collator = DataCollatorWithPadding(tokenizer)
    if script.quick:  # a stand-in for a fine-tuned parent: fit the larger BERT first
        Trainer(parent, HKTTrainingArguments(output_dir=f"{args.output_dir}/parent", **QUICK),
                train_dataset=data["train"], data_collator=collator).train()

    trainer = HKTTrainer(child, args, train_dataset=data["train"], eval_dataset=data[script.eval_split],
                         data_collator=collator, processing_class=tokenizer, compute_metrics=accuracy,
                         parent_model=parent)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()  # child + tokenizer + hkt_config.json
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


if __name__ == "__main__":
    main()
