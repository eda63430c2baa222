"""`tasks.py` (task and Auto class from transformers' Auto mappings, including registered models) and `auto`
carriers for every kind of head: LM heads via `get_output_embeddings()`, classification and QA heads."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import helpers as H
from hkt_hf.carriers import resolve_carriers
from hkt_hf.apps.models import CifarResNetForImageClassification, RaftForOpticalFlow
from hkt_hf.probing import head_replay_possible, probe
from hkt_hf.tasks import auto_class_for, is_classifier, task_of

BERT = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32)


@pytest.mark.parametrize(
    ("cls", "task", "auto"),
    [
        (GPT2LMHeadModel, "text-generation", AutoModelForCausalLM),
        (LlamaForCausalLM, "text-generation", AutoModelForCausalLM),
        (T5ForConditionalGeneration, "text2text-generation", AutoModelForSeq2SeqLM),
        (BertForMaskedLM, "fill-mask", AutoModelForMaskedLM),
        (transformers.BertForSequenceClassification, "text-classification", AutoModelForSequenceClassification),
        (BertForTokenClassification, "token-classification", transformers.AutoModelForTokenClassification),
        (BertForQuestionAnswering, "question-answering", transformers.AutoModelForQuestionAnswering),
        (transformers.ViTForImageClassification, "image-classification", AutoModelForImageClassification),
        (transformers.Wav2Vec2ForSequenceClassification, "audio-classification",
         transformers.AutoModelForAudioClassification),
        (CifarResNetForImageClassification, "image-classification", AutoModelForImageClassification),  # registered
        (RaftForOpticalFlow, None, AutoModel),  # registered with AutoModel only
        (BertModel, None, AutoModel),
    ],
)
def test_task_and_auto_class_from_the_auto_mappings(cls, task, auto):
    assert task_of(cls) == task and auto_class_for(cls) is auto
    assert is_classifier(cls) == (task in {"text-classification", "token-classification", "image-classification",
                                           "audio-classification"})


def test_subclasses_and_peft_models_resolve_to_their_base():
    class MyLlama(LlamaForCausalLM):
        pass

    assert task_of(MyLlama) == "text-generation" and auto_class_for(MyLlama) is AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert task_of(lora) == "text-generation" and auto_class_for(lora) is AutoModelForCausalLM


def test_unregistered_model_is_a_clear_error():
    class Plain(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="No transformers Auto class loads Plain: register it first"):
        auto_class_for(Plain)


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def tiny_t5() -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               decoder_start_token_id=0, dropout_rate=0.0))


@pytest.mark.parametrize(
    ("build", "head"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2)), "lm_head"),
        (tiny_llama, "lm_head"),
        (tiny_t5, "lm_head"),
        (lambda: BertForMaskedLM(BERT), "cls.predictions.decoder"),
        (lambda: BertForTokenClassification(BERT), "classifier"),
        (lambda: BertForQuestionAnswering(BERT), "qa_outputs"),
        (lambda: H.tiny_vit(16), "classifier"),
    ],
)
def test_auto_carrier_is_the_input_of_the_prediction_head(build, head):
    (pair,) = resolve_carriers(["auto"], build(), build())
    assert str(pair) == f"{head}:input={head}:input"


def test_a_model_without_a_head_keeps_a_clear_error():
    with pytest.raises(ValueError, match=r"Cannot find the prediction head of the parent \(BertModel, task unknown\)"):
        resolve_carriers(["auto"], BertModel(BERT), BertModel(BERT))


def test_t5_replays_the_decoder_lm_head_and_takes_encoder_carriers_by_name():
    parent, child = tiny_t5(), tiny_t5()
    batch = {"input_ids": torch.randint(1, 30, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "labels": torch.randint(1, 30, (2, 5))}
    carriers = resolve_carriers(["auto"], parent, child)
    assert head_replay_possible(carriers, parent, child)
    parent_shapes, child_shapes, replay = probe(parent, child, carriers, batch, True)
    assert replay and parent_shapes == child_shapes == [(5, 16)]  # decoder tokens, as long as the labels
    encoder = resolve_carriers(["encoder.block.0=encoder.block.0"], parent, child)
    assert probe(parent, child, encoder, batch, False)[0] == [(7, 16)]


def token_rows(n: int, labels: str) -> list[dict]:
    """Fixed-length rows: T5 targets of 5 tokens, or one label per input token (-100 on the last two)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 30, (7,), generator=g)
        target = torch.randint(1, 30, (5,), generator=g) if labels == "seq2seq" else ids.clone() % 2
        if labels != "seq2seq":
            target[-2:] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones(7, dtype=torch.long), "labels": target})
    return rows


@pytest.mark.parametrize(
    ("build", "labels", "carriers"),
    [
        (tiny_t5, "seq2seq", ["auto", "encoder.block.0=encoder.block.0"]),
        (lambda: BertForMaskedLM(BERT), "tokens", ["auto"]),
        (lambda: BertForTokenClassification(BERT), "tokens", ["auto"]),
    ],
    ids=["t5", "masked-lm", "token-classification"],
)
def test_hkt_trains_seq2seq_masked_lm_and_token_classifiers(build, labels, carriers, tmp_path):
    from hkt_hf import HKTTrainer

    torch.manual_seed(0)
    child, parent = build(), build()
    before = {k: v.clone() for k, v in child.state_dict().items()}
    args = H.training_args(tmp_path, hkt_parent=None, hkt_carriers=carriers, per_device_train_batch_size=4,
                           max_steps=2, remove_unused_columns=False, hkt_kd_weight=0.5)
    trainer = HKTTrainer(model=child, args=args, parent_model=parent, train_dataset=token_rows(8, labels))
    with H.one_torch_thread():
        trainer.train()
    log = next(h for h in trainer.state.log_history if "hkt/loss_kd" in h)
    assert all(torch.isfinite(torch.tensor(log[f"hkt/loss_{n}"])) for n in ("native", "child_mixed", "parent_head"))
    assert any(not torch.equal(before[k], v) for k, v in child.state_dict().items())
