"""PEFT children and parents: a LoRA child trains with HKT, its checkpoints hold the Trainer's adapter files plus the
HKT state, resume is exact, and saving writes what the plain Trainer writes plus the lineage; a parent given as a
LoRA adapter folder is loaded on its base model and merged."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.adapter import ADAPTER_WEIGHTS_NAME
from hkt_hf.lineage import HKT_CONFIG_NAME

VOCAB = 30


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def lora_child(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    return get_peft_model(H.tiny_bert(16, vocab_size=VOCAB, seed=seed), config)


def token_dataset(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2} for i in range(n)]


def run(tmp_path, resume: str | None = None, **args) -> HKTTrainer:
    values = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2, optim="adamw_torch",
                  hkt_gate="learned", remove_unused_columns=False) | args
    trainer = HKTTrainer(lora_child(), H.training_args(tmp_path, **values), train_dataset=token_dataset(),
                         parent_model=H.tiny_bert(32, vocab_size=VOCAB, seed=1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_lora_child_checkpoints_hold_the_hkt_state_and_resume_exactly(tmp_path):
    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", ADAPTER_WEIGHTS_NAME, HKT_CONFIG_NAME} <= files
    assert not any(k.startswith("hkt_adapter") for k in load_file(checkpoint / "adapter_model.safetensors"))
    assert {"to_child.0.proj.weight", "gates.0.lam_logit"} <= set(load_file(checkpoint / ADAPTER_WEIGHTS_NAME))

    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == 4
    trained = {n for n, p in full.model.named_parameters() if p.requires_grad}
    assert trained and any("lora_" in n for n in trained)
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(full.hkt_adapter.state_dict().items(), resumed.hkt_adapter.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_saving_a_lora_child_writes_what_the_plain_trainer_writes_plus_the_lineage(tmp_path):
    plain = Trainer(lora_child(), TrainingArguments(str(tmp_path / "plain"), use_cpu=True, report_to="none",
                                                    max_steps=1, remove_unused_columns=False),
                    train_dataset=token_dataset())
    plain.save_model()
    trainer = run(tmp_path / "hkt", max_steps=1, save_strategy="no")
    trainer.save_model()
    plain_files = {p.name for p in (tmp_path / "plain").iterdir()}
    hkt_files = {p.name for p in (tmp_path / "hkt").iterdir()}
    assert hkt_files == plain_files | {HKT_CONFIG_NAME}
    assert "adapter_model.safetensors" in hkt_files and ADAPTER_WEIGHTS_NAME not in hkt_files


def test_a_parent_given_as_a_lora_adapter_folder_is_merged_on_its_base(tmp_path):
    H.tiny_bert(32, vocab_size=VOCAB, seed=1).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")  # the adapter records this path
    lora = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    batch = {k: torch.stack([row[k] for row in token_dataset(4)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = lora.eval()(**batch).logits
    args = H.training_args(tmp_path / "run", hkt_parent=str(tmp_path / "adapter"), max_steps=1,
                           remove_unused_columns=False)
    trainer = HKTTrainer(H.tiny_bert(16, vocab_size=VOCAB), args, train_dataset=token_dataset())
    parent = trainer.parent_model
    assert not isinstance(parent, PeftModel) and type(parent).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(parent.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    trainer.train()
    assert trainer.hkt_lineage["hkt_parent"] == str(tmp_path / "adapter")
