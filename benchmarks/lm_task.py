"""The causal language-modelling task of `benchmarks/language_model.py`, which `examples/language_modeling.py` uses too.

One definition of: the python-stdlib corpus (CPython's standard library source, one file per row), a byte-level BPE
tokenizer trained on its train split, fixed-length training blocks (transformers' run_clm `group_texts`), the
Llama-style parent and its child (a third of the layers, half the width), a parent trained from scratch with the
plain `Trainer` and cached as a `save_pretrained` folder with its tokenizer and the Trainer's model card, and
perplexity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from huggingface_hub import ModelCard
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "python-stdlib"
EOS, PAD = "<|endoftext|>", "<pad>"
SPLITS = ("train", "validation", "test")
# The corpus is CPython's source under the PSF License 2.0, which is not one of the Hub's license identifiers: the
# Hub's convention for such licenses is `license: other` with a name and a link.
LICENSE = {"license": "other", "license_name": "psf-2.0", "license_link": "https://docs.python.org/3/license.html"}
DATASET = "python-stdlib (CPython 3.11.7 standard library source)"
# The input of the LM head on both sides: what users get by default (`auto` resolves to `lm_head:input=lm_head:input`).
HEAD_CARRIER = "auto"


@dataclass(frozen=True)
class LMSizes:
    """Everything that defines the tokenizer, the data blocks and the parent: the key of their caches."""

    vocab_size: int
    block_size: int
    parent_layers: int
    parent_hidden: int
    parent_heads: int
    parent_steps: int
    batch_size: int
    lr: float
    train_rows: int | None = None  # a strided subset of the train split's files (None: all of them)
    eval_rows: int | None = None  # the same for validation and test

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# The full-size task, shared by the example and the benchmark (so they share a cached tokenizer and parent): a
# 6-layer, 256-wide parent (5.8 M parameters with a 4096-token vocabulary) trained for 800 steps of 16 x 128 tokens.
FULL_SIZES = LMSizes(vocab_size=4096, block_size=128, parent_layers=6, parent_hidden=256, parent_heads=4,
                     parent_steps=800, batch_size=16, lr=1e-3)


def layer_carriers(parent_layers: int, child_layers: int) -> list[str]:
    """Each child decoder layer's output takes the output of the parent layer at the same relative depth (the last
    child layer takes the last parent layer's): the pairs of HKT's `blocks` carriers for up to 3 child layers."""
    return [f"model.layers.{(i + 1) * parent_layers // child_layers - 1}=model.layers.{i}" for i in range(child_layers)]


def strided(ds: Dataset, rows: int | None) -> Dataset:
    """`rows` rows spread evenly over `ds` (all of it when `rows` is None or not smaller)."""
    return ds if rows is None or rows >= len(ds) else ds.select(range(0, len(ds), len(ds) // rows)[:rows])


def load_corpus(data_dir: str | Path, sizes: LMSizes) -> DatasetDict:
    """The corpus's three splits (columns path, text), as strided subsets when `sizes` asks for fewer rows: the rows
    are sorted by path, so the first N would all come from a few packages."""
    data_dir = Path(data_dir)
    missing = [s for s in SPLITS if not (data_dir / f"{s}.parquet").is_file()]
    if missing:
        files = ", ".join(f"{s}.parquet" for s in missing)
        raise FileNotFoundError(f"{data_dir} lacks {files}: pass --data_dir, a folder holding the python-stdlib "
                                "corpus (../shared/data/python-stdlib beside the repository).")
    corpus = load_dataset("parquet", data_files={s: str(data_dir / f"{s}.parquet") for s in SPLITS})
    return DatasetDict({s: strided(corpus[s], sizes.train_rows if s == "train" else sizes.eval_rows) for s in SPLITS})


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme: every byte is representable, so nothing is unknown), trained
    locally on `texts`; <|endoftext|> separates files, <pad> pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def lm_blocks(texts: Dataset, tokenizer: PreTrainedTokenizerFast, block_size: int) -> Dataset:
    """Files tokenized, each followed by <|endoftext|>, concatenated and cut into blocks of `block_size` tokens
    (the remainder is dropped, as run_clm's `group_texts` does); labels = input_ids (the model shifts them)."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": tokenizer([t + EOS for t in batch["text"]])["input_ids"]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        ids = [i for row in batch["input_ids"] for i in row]
        blocks = [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names)
    return tokens.map(group, batched=True, batch_size=1000).with_format("torch")


def parent_config(sizes: LMSizes, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.parent_hidden, num_hidden_layers=sizes.parent_layers,
        num_attention_heads=sizes.parent_heads, num_key_value_heads=sizes.parent_heads,
        intermediate_size=sizes.parent_hidden * 8 // 3 // 8 * 8, max_position_embeddings=sizes.block_size,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def child_config(parent: LlamaConfig) -> LlamaConfig:
    """A third of the parent's layers and half its width (same head size, so half the heads)."""
    config = LlamaConfig.from_dict(parent.to_dict())
    config.num_hidden_layers = max(1, parent.num_hidden_layers // 3)
    config.hidden_size = parent.hidden_size // 2
    config.intermediate_size = parent.intermediate_size // 2
    config.num_attention_heads = config.num_key_value_heads = max(1, parent.num_attention_heads // 2)
    config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose weights depend only on `seed`."""
    set_seed(seed)
    return LlamaForCausalLM(config)


# The training recipe of this task: AdamW, cosine with a short warm-up, whole blocks only, CPU-friendly settings.
RECIPE: dict[str, Any] = dict(
    lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01, adam_beta2=0.98, dataloader_drop_last=True,
    dataloader_num_workers=0, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
    per_device_eval_batch_size=32,
)


def lm_args(args_class: type = TrainingArguments, **overrides: Any) -> Any:
    """`RECIPE` as `TrainingArguments` or `HKTTrainingArguments`; `overrides` name the run (output_dir, seed,
    max_steps, batch size, lr, HKT settings...)."""
    return args_class(**{**RECIPE, **overrides})


def perplexity(metrics: dict[str, float], prefix: str = "eval") -> float:
    """exp of the mean token loss (every block has the same length, so the Trainer's per-block mean is per token)."""
    return math.exp(metrics[f"{prefix}_loss"])


def set_license(card_path: Path) -> None:
    """Give a card written by `Trainer.create_model_card` (which takes only a license identifier) the PSF license."""
    card = ModelCard.load(card_path)
    for key, value in LICENSE.items():
        setattr(card.data, key, value)
    card.save(card_path)


def cached_parent(folder: Path, sizes: LMSizes, tokenizer: PreTrainedTokenizerFast, data: DatasetDict
                  ) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The parent trained from scratch with the plain `Trainer` (seed 0) on `data["train"]`, saved with its tokenizer
    and `parent_info.json` (steps, seconds, validation and test perplexity); loaded from `folder` when done before.
    The folder appears only once complete (written under a temporary name, then renamed)."""
    info_path = folder / "parent_info.json"
    if not info_path.is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        trainer = Trainer(new_model(parent_config(sizes, tokenizer), seed=0),
                          lm_args(output_dir=str(tmp), seed=0,
                                  max_steps=sizes.parent_steps, per_device_train_batch_size=sizes.batch_size,
                                  learning_rate=sizes.lr, logging_steps=max(1, sizes.parent_steps // 10)),
                          train_dataset=data["train"], data_collator=default_data_collator, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        info = {"steps": sizes.parent_steps, "train_s": round(seconds, 1), "params": trainer.model.num_parameters(),
                "validation_perplexity": perplexity(trainer.evaluate(data["validation"])),
                "test_perplexity": perplexity(trainer.evaluate(data["test"], metric_key_prefix="test"), "test"),
                "sizes": asdict(sizes)}
        trainer.save_model()
        trainer.create_model_card(model_name="python-stdlib-llama-parent", language="code", dataset=DATASET,
                                  tags=["llama", "python", "hkt-parent"], tasks="text-generation")
        set_license(tmp / "README.md")
        (tmp / "parent_info.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, folder)
    return AutoModelForCausalLM.from_pretrained(folder), json.loads(info_path.read_text())


def cached_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """`train_tokenizer`, saved to `folder` once and loaded from it afterwards."""
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        train_tokenizer(texts, vocab_size).save_pretrained(tmp)
        os.replace(tmp, folder)
    return AutoTokenizer.from_pretrained(folder)


def prepare(data_dir: str | Path, sizes: LMSizes, cache: Path, parent_folder: str | Path | None = None
            ) -> tuple[PreTrainedTokenizerFast, DatasetDict, LlamaForCausalLM, dict[str, Any]]:
    """Tokenizer, blocks of every split, parent and its info. With `parent_folder` (a `save_pretrained` folder with
    its tokenizer) that parent is used; else the tokenizer and parent are trained once and cached under `cache`."""
    corpus = load_corpus(data_dir, sizes)
    if parent_folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(parent_folder)
    else:
        tokenizer = cached_tokenizer(cache / f"tokenizer-v{sizes.vocab_size}-r{sizes.train_rows or 'all'}",
                                     corpus["train"]["text"], sizes.vocab_size)
    data = DatasetDict({s: lm_blocks(corpus[s], tokenizer, sizes.block_size) for s in SPLITS})
    if parent_folder is not None:
        return tokenizer, data, AutoModelForCausalLM.from_pretrained(parent_folder), {"folder": str(parent_folder)}
    parent, info = cached_parent(cache / f"parent-{sizes.key()}", sizes, tokenizer, data)
    return tokenizer, data, parent, info
