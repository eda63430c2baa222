"""Real use, issue 22: gradient accumulation for every loss normalisation the Trainer knows, batch-norm statistics
with carriers inside a CNN, extractive question answering, padding-free packed batches, and speech seq2seq (Whisper).
Each compares with the plain Trainer where one applies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    DataCollatorForSeq2Seq,
    DataCollatorForLanguageModeling,
    DataCollatorWithFlattening,
    LlamaForCausalLM,
    Seq2SeqTrainer,
    T5ForConditionalGeneration,
    Trainer,
    ViTForImageClassification,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.apps.models import CifarResNetConfig, CifarResNetForImageClassification
from hkt_hf.trainer import HKTSeq2SeqTrainer
from hkt_hf.training_args import HKTSeq2SeqTrainingArguments
from test_language_models import tiny_lm
from test_seq2seq import copy_task, tiny_t5

VOCAB = len(H.word_tokenizer())


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


# ---- models and data -------------------------------------------------------------------------------------------


class PlainViTForImageClassification(ViTForImageClassification):
    """A classifier whose forward takes no `**kwargs`: the Trainer passes it no `num_items_in_batch` and divides its
    batch-mean loss by the accumulation steps itself."""

    def forward(self, pixel_values=None, labels=None):
        return super().forward(pixel_values=pixel_values, labels=labels)


def plain_vit(hidden: int, seed: int = 0) -> PlainViTForImageClassification:
    return PlainViTForImageClassification(H.tiny_vit(hidden, seed=seed).config)


class PlainLlamaForCausalLM(LlamaForCausalLM):
    """A causal LM whose forward takes no `**kwargs`: its loss is a token mean over each batch."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def plain_llama(hidden: int, seed: int = 0) -> PlainLlamaForCausalLM:
    return PlainLlamaForCausalLM(tiny_lm("llama", hidden, seed=seed).config)


def cifar_resnet(width: int, seed: int = 0) -> CifarResNetForImageClassification:
    torch.manual_seed(seed)
    return CifarResNetForImageClassification(CifarResNetConfig(depth=8, hidden_sizes=(width, width, 2 * width),
                                                               num_labels=H.NUM_LABELS))


def tiny_qa(hidden: int, layers: int = 2, seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForQuestionAnswering(config)


def tiny_token_classifier(hidden: int, seed: int = 0) -> BertForTokenClassification:
    config = H.tiny_bert(hidden, 30, num_labels=H.NUM_LABELS, seed=seed).config
    torch.manual_seed(seed)
    return BertForTokenClassification(config)


def dropout_free_t5(d_model: int, seed: int) -> T5ForConditionalGeneration:
    config = tiny_t5(d_model, seed).config
    config.dropout_rate = 0.0
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def tiny_whisper(hidden: int, seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=40, num_mel_bins=8, d_model=hidden, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * hidden,
                           decoder_ffn_dim=2 * hidden, max_source_positions=8, max_target_positions=16, dropout=0.0,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(config)


def token_rows(n: int, length: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (n, length), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": i % 2}
            for i in range(n)]


def tagged_rows(n: int, length: int = 8) -> list[dict]:
    """Token labels with a few -100 (positions without a target)."""
    rows = token_rows(n, length)
    for i, row in enumerate(rows):
        tags = row["input_ids"] % H.NUM_LABELS
        tags[: i % 3] = -100
        row["labels"] = tags
    return rows


def qa_rows(n: int, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30, (n, length), generator=g)
    starts = torch.randint(1, length - 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "start_positions": starts[i], "end_positions": starts[i] + i % 3} for i in range(n)]


def speech_rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    features = torch.randn(n, 8, 16, generator=g)
    labels = torch.randint(3, 40, (n, 6), generator=g)
    labels[::2, 4:] = -100  # padded label sequences
    return [{"input_features": features[i], "labels": labels[i]} for i in range(n)]


def lm_rows(n: int) -> list[dict]:
    tokenizer = H.word_tokenizer()
    return [{"input_ids": tokenizer(t)["input_ids"]} for t in H.sentiment_dataset(n, seed=3)["text"]]


LM_COLLATOR = DataCollatorForLanguageModeling(H.word_tokenizer(), mlm=False)

# name: (child, parent, training rows, collator or None)
CASES = {
    "bert": (lambda: H.tiny_bert(16, 30), lambda: H.tiny_bert(32, 30, seed=1), lambda: token_rows(16), None),
    "vit": (lambda: H.tiny_vit(16), lambda: H.tiny_vit(32, seed=1), lambda: H.image_dataset(16), None),
    "vit_without_kwargs": (lambda: plain_vit(16), lambda: plain_vit(32, seed=1), lambda: H.image_dataset(16), None),
    "cifar_resnet": (lambda: cifar_resnet(4), lambda: cifar_resnet(8, seed=1), lambda: H.image_dataset(16), None),
    "llama": (lambda: tiny_lm("llama", 16, seed=1), lambda: tiny_lm("llama", 32, seed=2), lambda: lm_rows(16),
              LM_COLLATOR),
    "llama_without_kwargs": (lambda: plain_llama(16, seed=1), lambda: plain_llama(32, seed=2), lambda: lm_rows(16),
                             LM_COLLATOR),
    "token_classifier": (lambda: tiny_token_classifier(16), lambda: tiny_token_classifier(32, seed=1),
                         lambda: tagged_rows(16), None),
    "t5": (lambda: dropout_free_t5(16, 0), lambda: dropout_free_t5(32, 1), lambda: copy_task(16),
           DataCollatorForSeq2Seq(H.word_tokenizer(), label_pad_token_id=-100)),
    "qa": (lambda: tiny_qa(16), lambda: tiny_qa(32, seed=1), lambda: qa_rows(16), None),
}


def run(case: str, tmp_path, hkt: bool, trainer_class=None, **overrides):
    """A short run of `case` with HKTTrainer (or the plain Trainer, `hkt=False`), same seeds and data."""
    make_child, make_parent, rows, collator = CASES[case]
    values = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                  remove_unused_columns=False) | overrides
    args = H.training_args(tmp_path / ("hkt" if hkt else "plain"), **values)
    child = make_child()
    kwargs = dict(train_dataset=rows(), data_collator=collator)
    if hkt:
        trainer = HKTTrainer(child, args, parent_model=make_parent(), **kwargs)
    else:
        trainer = (trainer_class or Trainer)(child, args, **kwargs)
    trainer.train()
    return trainer


def logged(trainer, key: str = "loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


# ---- 1. gradient accumulation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_native_only_hkt_equals_the_plain_trainer_with_accumulation(case, tmp_path):
    """Weights 1 0 0: whatever the Trainer does with a model's loss under accumulation (divide by the steps, by the
    item count, or, for BERT's batch-mean loss with `**kwargs`, by nothing), HKT does the same."""
    plain = run(case, tmp_path, hkt=False)
    hkt = run(case, tmp_path, hkt=True, hkt_loss_weights=[1, 0, 0])
    assert logged(hkt) == logged(plain) and len(logged(plain)) == 2
    assert_same_weights(hkt.model, plain.model)


def first_step(case: str, tmp_path, accumulation: int, hkt: bool = True):
    """(trainer, start weights) after one SGD step over the first 8 examples, as 8 / accumulation per micro-batch."""
    make_child = CASES[case][0]
    start = {k: v.clone() for k, v in make_child().state_dict().items()}
    trainer = run(case, tmp_path / f"ga{accumulation}", hkt, per_device_train_batch_size=8 // accumulation,
                  gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", max_grad_norm=1e9,
                  hkt_kd_weight=0.5, learning_rate=0.1, train_sampling_strategy="sequential")
    return trainer, start


def update(trainer, start: dict) -> dict[str, torch.Tensor]:
    return {k: v - start[k] for k, v in trainer.model.state_dict().items() if k in start and v.is_floating_point()}


HKT_PARTS = ("hkt/loss_native", "hkt/loss_child_mixed", "hkt/loss_parent_head", "hkt/loss_kd")


@pytest.mark.parametrize("case", ["vit", "vit_without_kwargs", "llama", "qa"])
def test_accumulated_hkt_step_equals_one_big_batch(case, tmp_path):
    """HKT terms on: 2 micro-batches of 4 give the update and the logged means of one batch of 8, for losses the
    Trainer normalises by the item count (ViT, Llama) and for batch means it divides by the steps (no `**kwargs`,
    QA, which has no `labels` to count)."""
    (small, start), (big, _) = first_step(case, tmp_path, 2), first_step(case, tmp_path, 1)
    for key, delta in update(big, start).items():
        torch.testing.assert_close(update(small, start)[key], delta, rtol=1e-4, atol=1e-7, msg=key)
    for key in ("loss", *HKT_PARTS):
        assert logged(small, key) == pytest.approx(logged(big, key), rel=1e-5, abs=1e-8), key


def test_batch_mean_loss_with_kwargs_weights_every_term_as_the_trainer_weights_it(tmp_path):
    """BERT's classifiers take `**kwargs` but return a batch mean: the plain Trainer then sums the micro-batch means
    (an accumulated step is `accumulation` times a big batch's). HKT scales every term alike, so the terms keep their
    weights, and logs their true means."""
    (plain_small, start), (plain_big, _) = (first_step("bert", tmp_path / "plain", a, hkt=False) for a in (2, 1))
    (small, _), (big, _) = first_step("bert", tmp_path, 2), first_step("bert", tmp_path, 1)
    for name, delta in update(plain_big, start).items():  # the Trainer's own convention
        torch.testing.assert_close(update(plain_small, start)[name], 2 * delta, rtol=1e-4, atol=1e-6)
    for name, delta in update(big, start).items():
        torch.testing.assert_close(update(small, start)[name], 2 * delta, rtol=1e-4, atol=1e-6, msg=name)
    for key in HKT_PARTS:
        assert logged(small, key) == pytest.approx(logged(big, key), rel=1e-5, abs=1e-8), key


# The factor the Trainer applies to an accumulated step's mean loss, by how it normalises the model's loss.
STEP_FACTOR = {"bert": 2, "cifar_resnet": 1, "vit": 1, "vit_without_kwargs": 1, "llama": 1,
               "llama_without_kwargs": 1, "token_classifier": 2, "t5": 2, "qa": 1}


@pytest.mark.parametrize("case", list(STEP_FACTOR))
def test_logged_loss_is_the_weighted_sum_of_the_logged_means(case, tmp_path):
    """Under accumulation the logged `loss` is w . (the logged means of the terms), times the Trainer's own factor
    for the model (2 where it sums batch means): no term is weighted apart from the others."""
    (small, _) = first_step(case, tmp_path, 2)
    weighted = sum(w * logged(small, key)[0] for w, key in zip((1, 1, 1, 0.5), HKT_PARTS))
    assert logged(small)[0] == pytest.approx(STEP_FACTOR[case] * weighted, rel=1e-4)


# ---- 2. batch-norm statistics --------------------------------------------------------------------------------------


def norm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def plain_train_pass(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The buffers after one train-mode forward of a copy of `model` on `batch`."""
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        twin(pixel_values=batch["pixel_values"])
    return norm_buffers(twin)


BN_CARRIERS = {"hf_resnet": (lambda: H.tiny_resnet(8), lambda: H.tiny_resnet(16, seed=1),
                             "resnet.encoder.stages.0=resnet.encoder.stages.0"),
               "cifar_resnet": (lambda: cifar_resnet(4), lambda: cifar_resnet(8, seed=1),
                                "resnet.layer2=resnet.layer2")}


@pytest.mark.parametrize("kd", [0.0, 0.5], ids=["no_kd", "kd"])
@pytest.mark.parametrize("case", list(BN_CARRIERS))
def test_intermediate_carriers_count_batch_norm_statistics_once(case, kd, tmp_path):
    make_child, make_parent, carrier = BN_CARRIERS[case]
    child, parent = make_child(), make_parent()
    dataset = H.image_dataset(8)
    args = H.training_args(tmp_path, hkt_carriers=[carrier], hkt_parent_mode="train-bn", hkt_kd_weight=kd,
                           remove_unused_columns=False)
    trainer = HKTTrainer(child, args, train_dataset=dataset, parent_model=parent)
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    child.train()
    expected_child, expected_parent = plain_train_pass(child, batch), plain_train_pass(parent, batch)
    trainer.compute_loss(child, batch).backward()
    assert not trainer._objective.replay  # the mixed passes ran
    got = norm_buffers(child)
    for name, value in expected_child.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    # The train-bn parent counts the batch once: with KD its plain pass (exactly a plain pass), without KD its one
    # truncated pass (the reference code's single hooked pass: statistics downstream of m are m's).
    got = norm_buffers(trainer.parent_model)
    for name, value in expected_parent.items():
        if name.endswith("num_batches_tracked"):
            assert got[name].item() == 1, name
        elif kd:
            torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


# ---- 3. extractive question answering ----------------------------------------------------------------------------


def qa_trainer(tmp_path, **overrides) -> HKTTrainer:
    values = dict(max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False) | overrides
    return HKTTrainer(tiny_qa(16), H.training_args(tmp_path, **values), parent_model=tiny_qa(32, seed=1),
                      train_dataset=qa_rows(16))


def test_question_answering_trains_with_auto_carriers_and_replays_its_head(tmp_path):
    trainer = qa_trainer(tmp_path, hkt_kd_weight=0.5)
    assert trainer.label_names == ["start_positions", "end_positions"]
    assert str(trainer.carriers[0]) == "qa_outputs:input=qa_outputs:input"
    before = copy.deepcopy(trainer.model)
    trainer.train()
    assert trainer._objective.replay
    log = next(h for h in trainer.state.log_history if "hkt/loss_kd" in h)
    assert all(math.isfinite(log[k]) for k in HKT_PARTS)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), trainer.model.parameters()))


def test_question_answering_terms_equal_hand_computations(tmp_path):
    """lambda 0 (m = q): the replayed child head gives the child's own loss; KD is the mean of the start and end
    distillation terms over the positions."""
    trainer = qa_trainer(tmp_path, hkt_lambda=0.0, hkt_kd_weight=1.0, hkt_kd_temperature=2.0)
    batch = trainer.data_collator(qa_rows(4))
    child, parent = trainer.model, trainer.parent_model
    child.train()
    trainer.compute_loss(child, batch)
    result = trainer._objective(child, child.hkt_adapter, batch, trainer._native_loss,
                                label_names=trainer.label_names)
    torch.testing.assert_close(result.parts["child_mixed"], result.parts["native"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        c, p = child(**batch), parent(**batch)
    kd = sum(F.kl_div(F.log_softmax(cl / 2, -1), F.log_softmax(pl / 2, -1), log_target=True, reduction="batchmean")
             for cl, pl in ((c.start_logits, p.start_logits), (c.end_logits, p.end_logits))) / 2 * 4
    torch.testing.assert_close(result.parts["kd"], kd, rtol=1e-5, atol=1e-6)


def test_question_answering_trains_with_named_block_carriers(tmp_path):
    trainer = qa_trainer(tmp_path, hkt_carriers=["bert.encoder.layer.1=bert.encoder.layer.1",
                                                 "bert.encoder.layer.0=bert.encoder.layer.0"])
    trainer.train()
    assert not trainer._objective.replay
    log = next(h for h in trainer.state.log_history if "hkt/loss_parent_head" in h)
    assert all(math.isfinite(log[k]) for k in HKT_PARTS[:3])


# ---- 4. padding-free packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_batch_gives_the_terms_and_gates_of_the_padded_batch(kind, attention, tmp_path):
    """Padding-free batches (`DataCollatorWithFlattening`: one row, `position_ids`, no attention mask) keep their
    sequences apart in every pass of both models, so all HKT terms and gate statistics equal the padded batch's."""
    child, parent = tiny_lm(kind, 16, seed=1), tiny_lm(kind, 32, seed=2)
    for model in (child, parent):
        model.config._attn_implementation = attention
    carriers = ["auto", "model.layers.1=model.layers.0"]
    args = H.training_args(tmp_path, hkt_carriers=carriers, hkt_kd_weight=0.5, remove_unused_columns=False)
    rows = lm_rows(4)
    packed = DataCollatorWithFlattening()([dict(r, labels=r["input_ids"]) for r in rows])
    padded = LM_COLLATOR(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    trainer = HKTTrainer(child, args, train_dataset=rows, data_collator=LM_COLLATOR, parent_model=parent)
    child.train()
    trainer.compute_loss(child, padded)  # builds the adapter
    results = [trainer._objective(child, child.hkt_adapter, batch, trainer._native_loss) for batch in (padded, packed)]
    logs = [r.logs for r in results]
    assert set(logs[0]) == set(logs[1]) and len(logs[0]) == 4 + 2 * 2
    for key, value in logs[0].items():
        torch.testing.assert_close(logs[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---- 5. speech sequence-to-sequence (Whisper) -------------------------------------------------------------------


def whisper_run(tmp_path, hkt: bool, **overrides):
    values = dict(output_dir=str(tmp_path / ("hkt" if hkt else "plain")), use_cpu=True, report_to="none",
                  disable_tqdm=True, seed=0, save_strategy="no", per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                  remove_unused_columns=False) | overrides
    args = HKTSeq2SeqTrainingArguments(**values)
    child = tiny_whisper(16)
    if hkt:
        trainer = HKTSeq2SeqTrainer(child, args, parent_model=tiny_whisper(32, seed=1), train_dataset=speech_rows(8))
    else:
        trainer = Seq2SeqTrainer(child, args, train_dataset=speech_rows(8))
    trainer.train()
    return trainer


def test_whisper_trains_with_auto_carriers(tmp_path):
    trainer = whisper_run(tmp_path, hkt=True, hkt_kd_weight=0.5)
    assert str(trainer.carriers[0]) == "proj_out:input=proj_out:input"
    assert trainer._objective.replay
    log = next(h for h in trainer.state.log_history if "hkt/loss_kd" in h)
    assert all(math.isfinite(log[k]) for k in HKT_PARTS)


def test_whisper_native_only_equals_seq2seq_trainer(tmp_path):
    plain = whisper_run(tmp_path, hkt=False)
    hkt = whisper_run(tmp_path, hkt=True, hkt_loss_weights=[1, 0, 0])
    assert logged(hkt) == logged(plain) and len(logged(plain)) == 2
    assert_same_weights(hkt.model, plain.model)
