"""The two-name swap in a typical text-classification script: tiny BERT child and parent, an offline word-level
tokenizer, `datasets.map` tokenisation, dynamic padding, metrics, evaluation, prediction and `save_model`.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
)

import helpers as H
from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.lineage import HKT_CONFIG_NAME


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def test_typical_text_classification_script(tmp_path):
    (args,) = HfArgumentParser(HKTTrainingArguments).parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path / "run"), "--hkt_gate", "genetic", "--hkt_carriers", "auto",
        "--hkt_loss_weights", "1", "0.5", "0.5", "--hkt_kd_weight", "0.5", "--use_cpu", "true",
        "--per_device_train_batch_size", "16", "--num_train_epochs", "6", "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "4", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--seed", "0",
    ])
    tokenizer = H.word_tokenizer()
    raw = DatasetDict(train=H.sentiment_dataset(64), test=H.sentiment_dataset(32, seed=1))
    dataset = raw.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=16), batched=True)
    child = H.tiny_bert(32, vocab_size=len(tokenizer), dropout=0.1)
    parent = H.tiny_bert(48, vocab_size=len(tokenizer), layers=2, seed=1)
    trainer = HKTTrainer(
        model=child, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=H.accuracy,
        parent_model=parent,
    )
    before, after, prediction = H.train_between_child_only_evaluations(trainer, parent, dataset["test"])

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"hkt/loss_native", "hkt/loss_child_mixed", "hkt/loss_parent_head", "hkt/loss_kd"} <= set(logs[0])
    assert logs[-1]["hkt/loss_native"] < 0.8 * logs[0]["hkt/loss_native"]
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] > before["eval_accuracy"]
    assert prediction.predictions.shape == (32, 2)
    assert not hasattr(child, "hkt_adapter") and H.hooked_modules(child) == []

    trainer.save_model()
    out = tmp_path / "run"
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert list(loaded.state_dict()) == list(child.state_dict())
    encoded = reloaded_tokenizer(raw["test"]["text"][:4], padding=True, return_tensors="pt")
    child.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encoded).logits, child(**encoded).logits)
        torch.testing.assert_close(torch.as_tensor(prediction.predictions[:4]), child(**encoded).logits,
                                   rtol=1e-4, atol=1e-5)
    saved = json.loads((out / HKT_CONFIG_NAME).read_text())
    assert saved["hkt_carriers"] == ["classifier:input=classifier:input"] and saved["hkt_kd_weight"] == 0.5
