"""Text classifiers with dynamic padding: token carriers of different widths across batches of different lengths
(BERT parent -> DistilBERT child, RoBERTa), the gate at the token the classifier reads, and token-aligned inputs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    DataCollatorWithPadding,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import helpers as H
from hkt_hf import HKTTrainer

TOKENIZER = H.word_tokenizer()
VOCAB = len(TOKENIZER)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


@pytest.fixture(scope="module")
def sentences():
    """Tokenised sentences of 5 to 11 tokens: dynamically padded batches have different lengths."""
    data = H.sentiment_dataset(48, seed=2)
    rows = [{**TOKENIZER(text), "labels": label} for text, label in zip(data["text"], data["label"])]
    lengths = {len(r["input_ids"]) for r in rows}
    assert len(lengths) > 2
    return rows


def tiny_distilbert(dim: int, seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=VOCAB, dim=dim, n_layers=1, n_heads=2, hidden_dim=2 * dim, dropout=0.0,
                              attention_dropout=0.0, seq_classif_dropout=0.0, max_position_embeddings=32, pad_token_id=0)
    return DistilBertForSequenceClassification(config)


def tiny_roberta(hidden: int, seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=40, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=0)
    return RobertaForSequenceClassification(config)


def tiny_llama_classifier(hidden: int, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                         num_labels=2)
    return LlamaForSequenceClassification(config)


def train(child, parent, tmp_path, rows, carriers) -> HKTTrainer:
    args = H.training_args(tmp_path, hkt_parent=None, hkt_carriers=carriers, per_device_train_batch_size=4,
                           max_steps=4, remove_unused_columns=False, hkt_kd_weight=0.5)
    trainer = HKTTrainer(model=child, args=args, parent_model=parent, train_dataset=rows, eval_dataset=rows[:8],
                         data_collator=DataCollatorWithPadding(TOKENIZER))
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    return trainer


def logged(trainer: HKTTrainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "hkt/loss_native" in h]


def test_bert_parent_teaches_a_distilbert_child_through_token_carriers(tmp_path, sentences):
    """Parent 32 wide, child 16 wide; layer outputs [B, N, D] with N changing from batch to batch."""
    carrier = "bert.encoder.layer.0=distilbert.transformer.layer.0"
    trainer = train(tiny_distilbert(16, seed=1), H.tiny_bert(32, VOCAB, seed=2), tmp_path, sentences,
                    ["auto", carrier])
    logs = logged(trainer)
    assert len(logs) == 4
    for log in logs:
        assert 0 < log[f"hkt/{carrier}/gate_mean"] < 1
        assert 0 <= log[f"hkt/{carrier}/gate_at_head_token"] <= 1  # DistilBERT reads the first token
    assert "hkt/classifier:input=classifier:input/gate_at_head_token" not in logs[0]  # vectors: one gate per sample


def test_roberta_head_input_tokens_with_dynamic_padding(tmp_path, sentences):
    """RoBERTa's head takes all tokens and reads the first: `auto` carries tokens and replays the heads."""
    trainer = train(tiny_roberta(16, seed=1), tiny_roberta(32, seed=2), tmp_path, sentences, ["auto"])
    name = "classifier:input=classifier:input"
    assert all(f"hkt/{name}/gate_at_head_token" in log for log in logged(trainer))
    assert trainer._objective.replay


def test_decoder_classifier_gate_at_the_last_real_token(tmp_path, sentences):
    """Llama's classifier reads the last non-padding token: the logged value is the gate there."""
    child, parent = tiny_llama_classifier(16, seed=1), tiny_llama_classifier(32, seed=2)
    carrier = "model.layers.1=model.layers.0"
    args = H.training_args(tmp_path, hkt_parent=None, hkt_carriers=[carrier], remove_unused_columns=False)
    trainer = HKTTrainer(model=child, args=args, parent_model=parent, train_dataset=sentences,
                         data_collator=DataCollatorWithPadding(TOKENIZER))
    batch = DataCollatorWithPadding(TOKENIZER)([sentences[i] for i in (0, 3, 7, 11)])
    assert not batch["attention_mask"].all()
    adapter = trainer.hkt_adapter
    child.train()
    result = trainer._objective(child, adapter, batch, trainer._native_loss)
    last = batch["attention_mask"].sum(1) - 1  # right padding
    gate = result.gates[carrier].gate
    expected = gate[torch.arange(4), last].mean()
    assert result.stats[f"hkt/{carrier}/gate_at_head_token"].item() == pytest.approx(expected.item(), rel=1e-6)
    mask = batch["attention_mask"].bool()
    assert result.stats[f"hkt/{carrier}/gate_mean"].item() == pytest.approx(gate[mask].mean().item(), rel=1e-5)


def test_token_features_of_different_lengths_ask_for_token_aligned_inputs(tmp_path, sentences):
    """Parent and child reading differently padded batches (as with two tokenizers) cannot be mixed token by token."""
    child, parent = tiny_roberta(16, seed=1), tiny_roberta(32, seed=2)
    args = H.training_args(tmp_path, hkt_parent=None, remove_unused_columns=False)
    trainer = HKTTrainer(model=child, args=args, parent_model=parent, train_dataset=sentences,
                         data_collator=DataCollatorWithPadding(TOKENIZER))
    batch = DataCollatorWithPadding(TOKENIZER)(sentences[:4])
    adapter = trainer.hkt_adapter
    longer = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in batch.items() if k != "labels"}
    original = parent.forward
    parent.forward = lambda **kw: original(**longer)  # the parent sees 3 more (padding) tokens
    child.train()
    with pytest.raises(ValueError, match="HKT needs token-aligned inputs"):
        trainer._objective(child, adapter, batch, trainer._native_loss)
