"""Carriers and batches (docs/reliability.md, "Carriers and batches"): a carrier module that runs several times in
one pass, or whose output has no gradient path while trainable modules run before it, is refused, naming it; odd
batches take the plain Trainer's step: a batch with no rows, one without `labels`, or one whose labels are all -100
gives what `transformers.Trainer` gives on the same child and batch (its error, or its zero-gradient step and logged
loss), also under gradient accumulation; and what a batch skipped by `hkt_on_nonfinite="skip"` really does to the
weights, Adam's moments, the schedule and the logs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.extraction import CarrierError, FeatureExtractor, FeatureSpec
from test_parent_faults import tokenized

VOCAB = len(H.word_tokenizer())
TOKENS = [2, 4, 5, 6, 7, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def llama(hidden: int) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3))


def gpt2(hidden: int) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=1, n_head=2, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2,
                                      eos_token_id=3))


def bert_mlm(hidden: int) -> nn.Module:
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def t5(hidden: int) -> nn.Module:
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1,
                                               num_heads=2, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))


MODELS = {"llama": llama, "gpt2": gpt2, "bert-mlm": bert_mlm, "t5": t5,
          "bert-classifier": lambda hidden: H.tiny_bert(hidden, VOCAB, seed=hidden)}


def model(kind: str, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind](hidden)


def collator(kind: str, fault: str):
    """Batches of `TOKENS` rows; a batch whose rows are `{"fault": True}` is made faulty: no rows ("empty"), no
    `labels` ("no-labels"), or labels all -100 ("ignored")."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        faulty = rows[0]["fault"]
        ids = torch.tensor([TOKENS] * len(rows))
        labels = torch.zeros(len(rows), dtype=torch.long) if kind == "bert-classifier" else ids.clone()
        if faulty and fault == "ignored":
            labels = torch.full_like(labels, -100)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if faulty and fault == "empty":
            batch = {key: value[:0] for key, value in batch.items()}
        if faulty and fault == "no-labels":
            del batch["labels"]
        return batch

    return collate


def run(trainer_class: type, kind: str, fault: str, tmp_path, rows: list[dict] | None = None, accumulation: int = 1,
        **hkt) -> tuple[str | None, list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train a fresh child for 2 steps (or 1 with `rows`); returns the error (type and message, or None), the logged
    losses, and the child's weights before and after."""
    child = model(kind, 16, seed=1)
    before = {k: v.detach().clone() for k, v in child.state_dict().items()}
    common = dict(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=True, report_to="none", disable_tqdm=True,
                  seed=0, save_strategy="no", per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                  max_steps=1 if rows else 2, learning_rate=1e-2, remove_unused_columns=False, logging_steps=1,
                  train_sampling_strategy="sequential")
    data = rows if rows is not None else [{"fault": True}] * 16
    kwargs = dict(train_dataset=data, data_collator=collator(kind, fault))
    trainer = None
    try:  # HKTTrainer probes its first batch when it is made: a batch the child cannot take fails there
        if trainer_class is HKTTrainer:
            trainer = HKTTrainer(child, H.training_args(**common, **hkt), parent_model=model(kind, 32, seed=2),
                                 **kwargs)
        else:
            trainer = Trainer(child, TrainingArguments(**common), **kwargs)
        trainer.train()
        error = None
    except Exception as err:  # noqa: BLE001 - the test compares whatever the plain Trainer raises
        error = f"{type(err).__name__}: {err}"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log] if trainer is not None else []
    return error, losses, before, {k: v.detach().clone() for k, v in child.state_dict().items()}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("fault, accumulation", [("empty", 1), ("no-labels", 1), ("ignored", 1), ("ignored", 2)])
def test_a_batch_without_items_behaves_as_in_the_plain_trainer(kind, fault, accumulation, tmp_path):
    plain_error, plain_losses, plain_before, plain_after = run(Trainer, kind, fault, tmp_path, accumulation=accumulation)
    error, losses, before, after = run(HKTTrainer, kind, fault, tmp_path, accumulation=accumulation,
                                       hkt_kd_weight=0.5)
    assert error == plain_error  # the same standard error (raised by the child, not by the parent), or none
    assert losses == plain_losses
    if plain_error is None:  # a zero-gradient step: nothing moved, in either
        assert all(torch.equal(plain_before[k], v) for k, v in plain_after.items())
        assert all(torch.equal(before[k], v) for k, v in after.items())
        assert losses and all(loss == 0.0 for loss in losses)


@pytest.mark.parametrize("kind", ["llama", "bert-classifier"])
def test_an_accumulated_batch_whose_labels_are_all_ignored_adds_nothing(kind, tmp_path):
    """Micro-batches A (real) + B (labels all -100) in one step give the update of A alone, as in the plain Trainer,
    and the logged loss relates to A's alone as the plain Trainer's does (its log sums the micro-batches' losses, which
    for a classifier are each a mean over the whole accumulated batch's items)."""
    real, ignored = [{"fault": False}] * 4, [{"fault": True}] * 4
    ratios = []
    for trainer_class in (Trainer, HKTTrainer):
        _, both_losses, start, both = run(trainer_class, kind, "ignored", tmp_path / "both", real + ignored,
                                          accumulation=2)
        _, alone_losses, _, alone = run(trainer_class, kind, "ignored", tmp_path / "alone", real)
        assert any(not torch.equal(start[k], v) for k, v in alone.items())
        for key, value in alone.items():
            torch.testing.assert_close(both[key], value, rtol=1e-5, atol=1e-7, msg=f"{trainer_class.__name__} {key}")
        ratios.append(both_losses[0] / alone_losses[0])
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-5)


# ---- carriers that run several times in one pass ------------------------------------------------------------------


def albert(hidden: int, seed: int) -> AlbertForSequenceClassification:
    """Two layers that are one shared module, as in every ALBERT."""
    torch.manual_seed(seed)
    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0))


def text_trainer(tmp_path, child: nn.Module, parent: nn.Module, carriers: list[str], **args) -> HKTTrainer:
    return HKTTrainer(child, H.training_args(tmp_path, hkt_carriers=carriers, max_steps=2, **args),
                      train_dataset=tokenized(16), parent_model=parent)


ALBERT_LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0"


@pytest.mark.parametrize("side", ["child", "parent"])
def test_a_shared_albert_layer_as_carrier_is_refused_before_the_first_step(side, tmp_path):
    child, parent = albert(16, seed=1), albert(32, seed=2)
    other = "albert.pooler"  # runs once
    carrier = f"{ALBERT_LAYER}={other}" if side == "parent" else f"{other}={ALBERT_LAYER}"
    start = {k: v.clone() for k, v in child.state_dict().items()}
    with pytest.raises(CarrierError, match=rf"The {side}'s carrier module '{ALBERT_LAYER}' ran 2 times in one forward "
                                           r"pass: it is a shared module .* Pick a module that runs once"):
        text_trainer(tmp_path, child, parent, [carrier])  # refused when the trainer probes its first batch
    assert all(torch.equal(start[k], v) for k, v in child.state_dict().items())
    assert H.hooked_modules(child) == [] and H.hooked_modules(parent) == []


def test_a_layer_called_twice_in_a_bert_is_refused(tmp_path):
    child = H.tiny_bert(16, VOCAB, layers=2, seed=1)
    child.bert.encoder.layer[1] = child.bert.encoder.layer[0]  # one module in two places
    with pytest.raises(CarrierError, match=r"The child's carrier module 'bert.encoder.layer.0' ran 2 times"):
        text_trainer(tmp_path, child, H.tiny_bert(32, VOCAB, layers=2, seed=2),
                     ["bert.encoder.layer.1=bert.encoder.layer.0"])


def test_every_pass_counts_calls_and_replaces_only_the_first():
    """The count covers any pass (probe, parent, child, truncated): a module called 3 times is named with 3, and a
    replacement never lands on a later call."""
    layer = nn.Linear(4, 4)
    seen = []

    def replace(index: int, feature: torch.Tensor) -> torch.Tensor:
        seen.append(feature)
        return torch.zeros_like(feature)

    with pytest.raises(CarrierError, match=r"module '' ran 3 times"):
        with FeatureExtractor(layer, [FeatureSpec("")], replace, role="child"):
            x = torch.ones(1, 4)
            for _ in range(3):
                x = layer(x)
    assert len(seen) == 1 and H.hooked_modules(layer) == []
    with pytest.raises(KeyError):  # an error inside the block is not masked by the count
        with FeatureExtractor(layer, [FeatureSpec("")], role="child"):
            layer(layer(torch.ones(1, 4)))
            raise KeyError("inner")


# ---- carriers without a gradient path ------------------------------------------------------------------------------


def without_grad(module: nn.Module, how: str) -> None:
    """Make `module` give an output that carries no gradient: run under torch.no_grad(), or detached."""
    original = module.forward

    def forward(*args, **kwargs):
        if how == "no_grad":
            with torch.no_grad():
                return original(*args, **kwargs)
        out = original(*args, **kwargs)
        return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()

    module.forward = forward


@pytest.mark.parametrize("how", ["no_grad", "detach"])
def test_a_carrier_without_gradient_path_below_trainable_modules_is_refused_at_the_first_step(how, tmp_path):
    child = H.tiny_bert(16, VOCAB, layers=2, seed=1)
    without_grad(child.bert.encoder.layer[0], how)
    start = {k: v.clone() for k, v in child.state_dict().items()}
    trainer = text_trainer(tmp_path, child, H.tiny_bert(32, VOCAB, layers=2, seed=2),
                           ["bert.encoder.layer.0=bert.encoder.layer.0"])
    with pytest.raises(CarrierError, match=r"The output of the child's carrier module 'bert.encoder.layer.0' .* does "
                                           r"not require grad .* trainable modules run before it "
                                           r"\(bert.embeddings.word_embeddings, "):
        trainer.train()
    assert trainer.state.global_step == 0 and all(torch.equal(start[k], v) for k, v in child.state_dict().items())


def frozen_embeddings(child: nn.Module) -> tuple[nn.Module, list[str]]:
    child.bert.embeddings.requires_grad_(False)
    return child, ["bert.embeddings=bert.embeddings"]


def lora_on_the_last_layer(child: nn.Module) -> tuple[nn.Module, list[str]]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=r".*layer\.1\.attention\.self\.(query|value)")
    return get_peft_model(child, config), ["bert.encoder.layer.0=bert.encoder.layer.0"]


@pytest.mark.parametrize("setup", [frozen_embeddings, lora_on_the_last_layer], ids=["frozen-stem", "lora"])
def test_a_carrier_before_every_trainable_parameter_trains_the_parts_downstream(setup, tmp_path):
    """Its feature needs no gradient (nothing upstream learns); the HKT terms still reach what lies after it."""
    child, carriers = setup(H.tiny_bert(16, VOCAB, layers=2, seed=1))
    trainable = {n: p.detach().clone() for n, p in child.named_parameters() if p.requires_grad}
    trainer = text_trainer(tmp_path, child, H.tiny_bert(32, VOCAB, layers=2, seed=2), carriers,
                           hkt_loss_weights=[0.0, 1.0, 1.0])
    trainer.train()
    moved = {n for n, p in child.named_parameters() if n in trainable and not torch.equal(trainable[n], p)}
    assert any("layer.1" in n for n in moved), moved  # reached only through the mixed feature: native weight 0
    log = trainer.state.log_history[0]
    assert math.isfinite(log["hkt/loss_child_mixed"]) and math.isfinite(log["hkt/loss_parent_head"])


# ---- what a skipped batch does ------------------------------------------------------------------------------------


class NaNParentAt(TrainerCallback):
    """Makes the parent's pooled feature NaN at training step `step` (after the shape probe); records, after each
    optimizer step, the child's weights, AdamW's state and the learning rate."""

    def __init__(self, module: nn.Module, step: int):
        self.step, self.state, self.seen = step, None, {}
        self.handle = module.register_forward_hook(self.hook)

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def hook(self, module, args, output):
        if self.state is not None and self.state.global_step + 1 == self.step:
            return output * float("nan")
        return None

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        adam = [optimizer.state[p] for p in model.parameters() if p in optimizer.state]
        self.seen[state.global_step] = dict(
            weights=torch.cat([p.detach().flatten() for p in model.parameters()]).clone(),
            exp_avg=torch.cat([s["exp_avg"].flatten() for s in adam]).clone(),
            exp_avg_sq=torch.cat([s["exp_avg_sq"].flatten() for s in adam]).clone(),
            adam_steps={float(s["step"]) for s in adam}, lr=lr_scheduler.get_last_lr()[0])


def test_a_skipped_step_moves_no_weight_nor_adam_moment_but_the_schedule_and_counters_advance(tmp_path):
    """With weight decay and momentum: every parameter's gradient is None on a skipped step (the Trainer sets
    gradients to None after each step), and AdamW leaves such parameters alone: no weight decay, no momentum
    update, no step count. The scheduler and `global_step` still advance; the step logs loss 0."""
    child, parent = H.tiny_resnet(8), H.tiny_resnet(16, seed=1)
    nan = NaNParentAt(parent.resnet.pooler, step=3)
    args = H.training_args(tmp_path, max_steps=4, per_device_train_batch_size=4, optim="adamw_torch",
                           weight_decay=0.1, lr_scheduler_type="linear", hkt_on_nonfinite="skip",
                           remove_unused_columns=False)
    trainer = HKTTrainer(child, args, train_dataset=H.image_dataset(32), parent_model=parent, callbacks=[nan])
    trainer.train()
    nan.handle.remove()
    seen = nan.seen
    assert trainer.hkt_skipped_batches == 1 and trainer.state.global_step == 4
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert torch.equal(seen[3][key], seen[2][key]), key  # the skipped step
        assert not torch.equal(seen[4][key], seen[3][key]), key  # the next one trains
    assert seen[2]["adam_steps"] == seen[3]["adam_steps"] == {2.0} and seen[4]["adam_steps"] == {3.0}
    assert seen[1]["lr"] > seen[2]["lr"] > seen[3]["lr"] > seen[4]["lr"]  # the schedule steps on regardless
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == [1, 2, 3, 4]
    assert logs[2]["loss"] == 0.0 and logs[2]["hkt/skipped_batches"] == 1 and logs[1]["loss"] > 0
