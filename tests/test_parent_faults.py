"""A parent that cannot teach is refused before the first step, naming what is wrong (docs/reliability.md, "The
parent"): weights that do not cover its model, a vocabulary other than the child's (causal, masked and seq2seq LMs,
and text classifiers: every model that reads token ids), a path that is a file; and a mixed-precision run leaves the user's parent object exactly as it was given."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

import helpers as H
from hkt_hf import HKTTrainer, HKTTrainingArguments

VOCAB = len(H.word_tokenizer())
SPECIALS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def llama(hidden: int, vocab: int = VOCAB, seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **SPECIALS) | config
    return LlamaForCausalLM(LlamaConfig(**values))


def bert(hidden: int, vocab: int = VOCAB, seed: int = 0, model_class: type = BertForMaskedLM, **config) -> nn.Module:
    torch.manual_seed(seed)
    values = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=32, pad_token_id=0, num_labels=2) | config
    return model_class(BertConfig(**values))


def t5(hidden: int, vocab: int = VOCAB, seed: int = 0, **config) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    values = dict(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1, num_heads=2,
                  pad_token_id=0, eos_token_id=3, decoder_start_token_id=0) | config
    return T5ForConditionalGeneration(T5Config(**values))


LMS = {"causal": llama, "masked": bert, "seq2seq": t5}
TEXT_MODELS = LMS | {"classifier": partial(bert, model_class=BertForSequenceClassification)}  # all read token ids


def lm_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 4, 5, 16, 17, 3], [2, 10, 11, 18, 6, 3]] * (len(rows) // 2 + 1))[: len(rows)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lm_trainer(tmp_path, child: nn.Module, parent: nn.Module | None = None, tokenizer=None, **args) -> HKTTrainer:
    values = dict(per_device_train_batch_size=4, max_steps=2, remove_unused_columns=False) | args
    return HKTTrainer(child, H.training_args(tmp_path / "run", **values), parent_model=parent,
                      train_dataset=[{}] * 8, data_collator=lm_batch, processing_class=tokenizer)


def save(model: nn.Module, folder, tokenizer=None) -> str:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def swapped_tokenizer(first: str = "good", second: str = "bad") -> PreTrainedTokenizerFast:
    """The helpers' word tokenizer with the ids of two words exchanged: as large, with other token ids."""
    from tokenizers import Tokenizer

    original = H.word_tokenizer()
    spec = json.loads(original.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


# ---- weights that do not cover the parent's model -----------------------------------------------------------------


def test_a_base_model_saved_for_a_classifier_child_is_refused_naming_the_head(tmp_path):
    config = H.tiny_bert(32, VOCAB).config
    BertModel(config).save_pretrained(tmp_path / "base")  # a headless base (AutoModel), no classifier weights
    args = H.training_args(tmp_path / "run", hkt_parent=str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"does not cover the BertForSequenceClassification .* module\(s\) classifier "
                                         r"\(classifier.bias, classifier.weight\)"):
        HKTTrainer(H.tiny_bert(16, VOCAB), args, train_dataset=[{}])


def test_a_base_model_saved_for_a_causal_lm_child_is_refused_naming_the_lm_head(tmp_path):
    """An untied LM head is a weight of its own: absent from a base model's file, it would be random."""
    torch.manual_seed(0)
    LlamaModel(llama(32, tie_word_embeddings=False).config).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"module\(s\) lm_head \(lm_head.weight\)"):
        lm_trainer(tmp_path, llama(16, tie_word_embeddings=False), hkt_parent=str(tmp_path / "base"))


def test_a_checkpoint_missing_some_weights_is_refused_naming_them(tmp_path):
    folder = save(H.tiny_bert(32, VOCAB, layers=2, seed=1), tmp_path / "parent")
    weights = load_file(tmp_path / "parent" / "model.safetensors")
    del weights["bert.encoder.layer.1.attention.self.query.weight"]
    save_file(weights, tmp_path / "parent" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"module\(s\) bert.encoder.layer.1.attention.self.query "):
        HKTTrainer(H.tiny_bert(16, VOCAB), H.training_args(tmp_path / "run", hkt_parent=folder), train_dataset=[{}])


@pytest.mark.parametrize("build", [lambda: llama(32, tie_word_embeddings=True),
                                   lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                                      n_positions=32, **SPECIALS))],
                         ids=["llama-tied", "gpt2"])
def test_an_lm_head_tied_to_the_embeddings_is_not_missing(build, tmp_path):
    parent = build()
    folder = save(parent, tmp_path / "parent")
    assert not any("lm_head" in key for key in load_file(tmp_path / "parent" / "model.safetensors"))
    trainer = lm_trainer(tmp_path, build(), hkt_parent=folder, max_steps=1)
    loaded = trainer.parent_model
    assert torch.equal(loaded.get_output_embeddings().weight, parent.get_input_embeddings().weight)


# ---- a parent path that is a file ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_parent_path_that_is_a_file_is_refused_when_the_arguments_are_built(name, tmp_path):
    save(H.tiny_bert(32, VOCAB), tmp_path / "parent")
    with pytest.raises(ValueError, match=r"a folder or a Hub id, not a file\. Give the folder that holds its "
                                         r"config\.json"):
        HKTTrainingArguments(str(tmp_path / "run"), hkt_parent=str(tmp_path / "parent" / name))


# ---- vocabularies of language models --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TEXT_MODELS))
def test_vocabularies_of_other_sizes_without_a_tokenizer_are_refused(kind, tmp_path):
    parent, child = TEXT_MODELS[kind](32, vocab=VOCAB + 10), TEXT_MODELS[kind](16)
    with pytest.raises(ValueError, match=r"differ in size, and no tokenizer can be seen .* processing_class"):
        lm_trainer(tmp_path, child, parent)


@pytest.mark.parametrize("kind", list(TEXT_MODELS))
def test_tokenizers_with_other_token_ids_are_refused(kind, tmp_path):
    """Same size, same special ids: only the tokenizers themselves show the difference."""
    folder = save(TEXT_MODELS[kind](32), tmp_path / "parent", swapped_tokenizer())
    with pytest.raises(ValueError, match=r"tokenizer .* differ on 2 tokens \('bad': parent 4, child 10; 'good'"):
        lm_trainer(tmp_path, TEXT_MODELS[kind](16), tokenizer=H.word_tokenizer(), hkt_parent=folder)


@pytest.mark.parametrize("kind", list(TEXT_MODELS))
def test_a_table_smaller_than_the_tokenizer_is_refused(kind, tmp_path):
    """Without this check the parent's embedding fails with an IndexError on the largest token ids."""
    parent, child = TEXT_MODELS[kind](32, vocab=VOCAB - 2), TEXT_MODELS[kind](16)
    with pytest.raises(ValueError, match=rf"The parent's input embeddings has {VOCAB - 2} rows, but the tokenizer has "
                                         rf"token ids up to {VOCAB - 1}"):
        lm_trainer(tmp_path, child, parent, tokenizer=H.word_tokenizer())


@pytest.mark.parametrize("kind", list(TEXT_MODELS))
def test_other_special_token_ids_are_refused_when_tokenizers_cannot_be_compared(kind, tmp_path):
    parent, child = TEXT_MODELS[kind](32, pad_token_id=1, eos_token_id=1), TEXT_MODELS[kind](16)
    with pytest.raises(ValueError, match=r"other special token ids \(pad_token_id: parent \[1\], child \[0\]"):
        lm_trainer(tmp_path, child, parent, tokenizer=H.word_tokenizer())


@pytest.mark.parametrize("kind", list(LMS))
def test_one_tokenizer_seen_on_both_sides_is_accepted(kind, tmp_path):
    folder = save(TEXT_MODELS[kind](32), tmp_path / "parent", H.word_tokenizer())
    trainer = lm_trainer(tmp_path, TEXT_MODELS[kind](16), tokenizer=H.word_tokenizer(), hkt_parent=folder, max_steps=1)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_one_tokenizer_padded_to_other_table_sizes_trains_with_kd_on_the_shared_tokens(tmp_path):
    """As Qwen2.5-0.5B (151936 rows) and -7B (152064): the parent's table has 8 padding rows past the tokenizer. KD
    compares the models on the tokenizer's ids: the child learns exactly what it learns from the same parent cut to
    the child's table (L_p*, the parent's own head loss over its own table, is left out to compare)."""
    padded = llama(32, vocab=VOCAB + 8, seed=2)
    cut = copy.deepcopy(padded)
    cut.resize_token_embeddings(VOCAB)
    assert cut.config.vocab_size == VOCAB
    children = []
    for name, parent in (("padded", padded), ("cut", cut)):
        child = llama(16, seed=1)
        trainer = lm_trainer(tmp_path / name, child, parent, tokenizer=H.word_tokenizer(), hkt_kd_weight=1.0,
                             hkt_loss_weights=[1.0, 1.0, 0.0], learning_rate=1e-2)
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["hkt/loss_kd"])
        children.append(child.state_dict())
    for key, value in children[0].items():
        torch.testing.assert_close(value, children[1][key], rtol=1e-5, atol=1e-6, msg=key)
    full = lm_trainer(tmp_path / "all-terms", llama(16, seed=1), padded, tokenizer=H.word_tokenizer(),
                      hkt_kd_weight=1.0)
    full.train()
    assert all(math.isfinite(full.state.log_history[0][f"hkt/loss_{part}"]) for part in ("parent_head", "kd"))


# ---- a mixed-precision run leaves the parent object as given ------------------------------------------------------


def tokenized(n: int) -> Dataset:
    tokenizer = H.word_tokenizer()
    data = H.sentiment_dataset(n).map(lambda b: tokenizer(b["text"], padding="max_length", max_length=12),
                                      batched=True)
    return data.rename_column("label", "labels").remove_columns(["text"]).with_format("torch")


def test_a_bf16_run_leaves_the_parent_object_as_given_and_an_fp32_run_can_share_it(tmp_path):
    data, parent = tokenized(16), H.tiny_bert(32, VOCAB, seed=1).eval()
    batch = {key: data[:4][key] for key in ("input_ids", "attention_mask")}
    attributes = set(vars(parent))
    with torch.no_grad():
        before = parent(**batch).logits
    HKTTrainer(H.tiny_bert(16, VOCAB, seed=2), H.training_args(tmp_path / "bf16", bf16=True, max_steps=2),
               train_dataset=data, parent_model=parent).train()
    assert "forward" not in vars(parent) and set(vars(parent)) == attributes
    with torch.no_grad():
        after = parent(**batch).logits
    assert after.dtype == torch.float32 and torch.equal(after, before)

    head_inputs: set[torch.dtype] = set()
    handle = parent.classifier.register_forward_pre_hook(lambda module, args: head_inputs.add(args[0].dtype))
    child = H.tiny_bert(16, VOCAB, seed=2)
    start = {k: v.clone() for k, v in child.state_dict().items()}
    trainer = HKTTrainer(child, H.training_args(tmp_path / "fp32", max_steps=2), train_dataset=data,
                         parent_model=parent)
    trainer.train()
    handle.remove()
    assert head_inputs == {torch.float32}  # the fp32 run's parent runs in fp32, not in the bf16 run's autocast
    assert any(not torch.equal(start[k], v) for k, v in child.state_dict().items())
    assert all(math.isfinite(v) for log in trainer.state.log_history for v in log.values() if isinstance(v, float))
