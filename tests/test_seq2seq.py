"""Sequence-to-sequence children: `HKTSeq2SeqTrainer` / `HKTSeq2SeqTrainingArguments` train a T5 child with HKT and
evaluate it the way `Seq2SeqTrainer` does (`predict_with_generate`), child alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, T5Config, T5ForConditionalGeneration

import helpers as H
from hkt_hf import HKTSeq2SeqTrainer, HKTSeq2SeqTrainingArguments, HKTTrainingArguments

VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def tiny_t5(d_model: int, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def copy_task(n: int, seed: int = 0) -> list[dict]:
    """Targets are the first half of the source, reversed: learnable by a tiny model; varied lengths need padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + i % 5
        source = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": source + [1], "attention_mask": [1] * (length + 1),
                     "labels": source[: length // 2][::-1] + [1]})
    return rows


def test_seq2seq_child_trains_and_evaluates_with_generate(tmp_path):
    args = HKTSeq2SeqTrainingArguments(
        str(tmp_path / "run"), use_cpu=True, report_to="none", max_steps=8, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-2, predict_with_generate=True, generation_max_length=8,
        logging_steps=4, save_strategy="no", seed=0, hkt_carriers=["lm_head:input=lm_head:input"],
    )
    assert isinstance(args, HKTTrainingArguments)
    child, parent = tiny_t5(16, 0), tiny_t5(32, 1)
    # As run_summarization.py builds it; the word-level tokenizer only pads here (its pad id is T5's, 0).
    collator = DataCollatorForSeq2Seq(H.word_tokenizer(), model=child, label_pad_token_id=-100)
    trainer = HKTSeq2SeqTrainer(model=child, args=args, parent_model=parent, train_dataset=copy_task(32),
                                eval_dataset=copy_task(8, seed=1), data_collator=collator)
    assert isinstance(trainer, Seq2SeqTrainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"hkt/loss_native", "hkt/loss_child_mixed", "hkt/loss_parent_head"} <= set(logs[-1])
    prediction = trainer.predict(copy_task(8, seed=1))
    assert prediction.predictions.ndim == 2 and prediction.predictions.dtype.kind == "i"  # generated token ids
    assert "test_loss" in prediction.metrics

    trainer.save_model()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run").eval()
    source = torch.tensor([copy_task(1, seed=2)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.generate(source, max_new_tokens=6, do_sample=False),
                                   child.eval().generate(source, max_new_tokens=6, do_sample=False))
    assert not any(name.startswith("hkt_adapter") for name in loaded.state_dict())
