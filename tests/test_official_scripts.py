"""The HKT versions of transformers' official example scripts (`examples/official/run_*.py`), end to end.

Each script runs as `python examples/official/run_*.py ARGS` would (`runpy`, in this process, so torch and
transformers are imported once), on a few dozen rows written here and tiny models saved here (a child and a wider
parent): it trains a few steps, evaluates, saves the child and writes the model card (the scripts' last line,
`trainer.create_model_card(**kwargs)`). The test reloads the child with its Auto class (and generates with the LM
children), checks the card's metadata and lineage section, and the lineage record `hkt_config.json`.
"""

from __future__ import annotations

import importlib
import json
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from helpers import EXAMPLES, one_torch_thread
from hkt_hf.hub import check_child_folder

SCRIPTS = EXAMPLES / "official"
LINEAGE_HEADING = "Hereditary Knowledge Transfer lineage"
HKT_TAGS = {"hkt", "knowledge-distillation", "hereditary-knowledge-transfer"}
WORDS = "the a cat dog bird sees eats likes runs sleeps big small red green fast slow happy sad good bad".split()
# A few steps of everything, on the CPU, nothing reported, no checkpoints.
COMMON_ARGS = [
    "--do_train", "--do_eval", "--max_steps", "3", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--seed", "0",
    "--logging_steps", "1",
]


def sentences(n: int, seed: int, length: tuple[int, int] = (4, 9)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*length))) for _ in range(n)]


def bpe_tokenizer(specials: list[str], **tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 300 tokens) trained here on the word list; `tokens` names its specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(200, seed=1), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **tokens)


def save(model: torch.nn.Module, folder: Path, *processors) -> str:
    model.save_pretrained(folder)
    for processor in processors:
        processor.save_pretrained(folder)
    return str(folder)


def run_script(name: str, args: list[str], monkeypatch) -> None:
    """Run `examples/official/<name>` as `python <name> ARGS` does, in this process (one import of torch and
    transformers for the four scripts, which matters on a busy 2-core machine)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # as for a script: its folder first (local_metrics.py)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *args, *COMMON_ARGS])
    with one_torch_thread():
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")


def check_outputs(out: Path, parent: str, *, tags: set[str], dataset: str | None = None) -> dict:
    """The card (metadata from the script's kwargs plus HKT's tags, and the lineage section), the plain child and its
    `hkt_config.json`, the HKT loss parts in the logs; returns the saved eval metrics."""
    card = ModelCard.load(out / "README.md")
    assert LINEAGE_HEADING in card.text
    assert f"`{parent}`" in card.text
    assert tags | HKT_TAGS <= set(card.data.tags)
    if dataset is not None:
        assert card.data.datasets == [dataset]
    check_child_folder(out)  # config, weights without aligner / gate keys, lineage record
    record = json.loads((out / "hkt_config.json").read_text())
    assert record["hkt_parent"] == parent
    assert record["hkt_carriers"]
    logged = {key for entry in json.loads((out / "trainer_state.json").read_text())["log_history"] for key in entry}
    assert {"hkt/loss_native", "hkt/loss_child_mixed", "hkt/loss_parent_head"} <= logged  # the HKT objective ran
    metrics = json.loads((out / "eval_results.json").read_text())
    assert all(np.isfinite(v) for v in metrics.values())
    return metrics


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory) -> tuple[str, str]:
    """(child, parent): a GPT-2 with one 16-wide layer and one with two 32-wide layers, sharing a tokenizer."""
    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = bpe_tokenizer(["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                              unk_token="<|endoftext|>", pad_token="<|endoftext|>")

    def gpt2(width: int, layers: int, seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=width, n_layer=layers,
                                          n_head=2, bos_token_id=0, eos_token_id=0))

    return save(gpt2(16, 1, 0), root / "child", tokenizer), save(gpt2(32, 2, 1), root / "parent", tokenizer)


def test_run_clm(tmp_path, monkeypatch, gpt2_folders):
    child, parent = gpt2_folders
    (tmp_path / "train.txt").write_text("\n".join(sentences(48, seed=2)) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(sentences(16, seed=3)) + "\n")
    out = tmp_path / "out"
    run_script("run_clm.py", [
        "--model_name_or_path", child, "--hkt_parent", parent,
        "--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt"),
        "--block_size", "16", "--output_dir", str(out),
    ], monkeypatch)
    metrics = check_outputs(out, parent, tags={"generated_from_trainer"})
    assert {"eval_loss", "eval_accuracy", "perplexity"} <= set(metrics)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("the cat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Sentences whose label is the mood word they contain."""
    rng = random.Random(seed)
    moods = {"positive": ["good", "happy"], "negative": ["bad", "sad"]}
    rows = []
    for text in sentences(n, seed):
        label = rng.choice(sorted(moods))
        rows.append({"sentence": f"{text} {rng.choice(moods[label])}", "label": label})
    return rows


def write_json_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory) -> tuple[str, str]:
    """(child, parent): BERT classifiers 16 and 32 wide with the labels of `sentiment_rows`, sharing a tokenizer."""
    root = tmp_path_factory.mktemp("bert")
    tokenizer = bpe_tokenizer(["[PAD]", "[UNK]"], pad_token="[PAD]", unk_token="[UNK]")
    labels = {0: "negative", 1: "positive"}

    def bert(width: int, layers: int, seed: int) -> BertForSequenceClassification:
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig(
            vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * width, max_position_embeddings=64, pad_token_id=0, id2label=labels,
        ))

    return save(bert(16, 1, 0), root / "child", tokenizer), save(bert(32, 2, 1), root / "parent", tokenizer)


def test_run_classification(tmp_path, monkeypatch, bert_folders):
    child, parent = bert_folders
    data = tmp_path / "sentiment"  # a local dataset folder: its train / validation files are the splits
    write_json_lines(data / "train.json", sentiment_rows(48, seed=4))
    write_json_lines(data / "validation.json", sentiment_rows(16, seed=5))
    out = tmp_path / "out"
    run_script("run_classification.py", [
        "--model_name_or_path", child, "--hkt_parent", parent, "--dataset_name", str(data), "--max_seq_length", "32",
        "--output_dir", str(out),
    ], monkeypatch)
    metrics = check_outputs(out, parent, tags={"generated_from_trainer"}, dataset=str(data))
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model(**tokenizer(["the cat is happy"], return_tensors="pt")).logits.shape == (1, 2)


def write_image_folder(folder: Path, per_class: int, seed: int) -> None:
    """An `imagefolder` layout: `red/` and `blue/` hold noisy 16x16 PNGs dominated by that colour."""
    rng = np.random.default_rng(seed)
    for channel, name in ((0, "red"), (2, "blue")):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, size=(16, 16, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory) -> tuple[str, str]:
    """(child, parent): ViT classifiers 16 and 32 wide on 16x16 images, labels `blue`, `red` (the folder order)."""
    root = tmp_path_factory.mktemp("vit")
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})

    def vit(width: int, layers: int, seed: int) -> ViTForImageClassification:
        torch.manual_seed(seed)
        return ViTForImageClassification(ViTConfig(
            image_size=16, patch_size=4, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * width, id2label={0: "blue", 1: "red"},
        ))

    return save(vit(16, 1, 0), root / "child", processor), save(vit(32, 2, 1), root / "parent", processor)


def test_run_image_classification(tmp_path, monkeypatch, vit_folders):
    child, parent = vit_folders
    write_image_folder(tmp_path / "train", per_class=16, seed=6)
    write_image_folder(tmp_path / "validation", per_class=6, seed=7)
    out = tmp_path / "out"
    run_script("run_image_classification.py", [
        "--model_name_or_path", child, "--hkt_parent", parent, "--train_dir", str(tmp_path / "train"),
        "--validation_dir", str(tmp_path / "validation"), "--remove_unused_columns", "False", "--output_dir", str(out),
    ], monkeypatch)
    metrics = check_outputs(out, parent, tags={"image-classification", "vision"})
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "blue", 1: "red"}
    assert model(pixel_values=torch.zeros(1, 3, 16, 16)).logits.shape == (1, 2)


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory) -> tuple[str, str]:
    """(child, parent): T5s 16 and 32 wide sharing a tokenizer with T5's special ids (pad 0, eos 1, unk 2)."""
    root = tmp_path_factory.mktemp("t5")
    tokenizer = bpe_tokenizer(["<pad>", "</s>", "<unk>"], pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    def t5(width: int, layers: int, seed: int) -> T5ForConditionalGeneration:
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers, num_heads=2,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))

    return save(t5(16, 1, 0), root / "child", tokenizer), save(t5(32, 2, 1), root / "parent", tokenizer)


def test_run_summarization(tmp_path, monkeypatch, t5_folders):
    child, parent = t5_folders
    for name, n, seed in (("train.json", 48, 8), ("valid.json", 8, 9)):
        rows = [{"document": text, "headline": " ".join(text.split()[:3])} for text in sentences(n, seed, (6, 12))]
        write_json_lines(tmp_path / name, rows)
    out = tmp_path / "out"
    run_script("run_summarization.py", [
        "--model_name_or_path", child, "--hkt_parent", parent,
        "--train_file", str(tmp_path / "train.json"), "--validation_file", str(tmp_path / "valid.json"),
        "--text_column", "document", "--summary_column", "headline", "--source_prefix", "summarize: ",
        "--max_source_length", "32", "--max_target_length", "8", "--predict_with_generate", "--output_dir", str(out),
    ], monkeypatch)
    metrics = check_outputs(out, parent, tags={"generated_from_trainer"})
    assert {"eval_loss", "eval_rouge1", "eval_rouge2", "eval_gen_len"} <= set(metrics)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer(["summarize: the cat sees a dog"], return_tensors="pt"), max_new_tokens=4)
    assert generated.shape[0] == 1 and 1 < generated.shape[1] <= 5


def test_local_metrics(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    metrics = importlib.import_module("local_metrics")
    assert metrics.accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == {"accuracy": 0.75}
    scores = metrics.rouge(["the cat sat", "a dog", "x"], ["the cat sat", "the dog", "y"])
    # pair 1 exact; pair 2 shares "dog" (P = R = 1/2) and no bigram; pair 3 nothing
    assert scores == pytest.approx({"rouge1": (1 + 0.5 + 0) / 3, "rouge2": (1 + 0 + 0) / 3})
