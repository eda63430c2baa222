"""Every optimizer trains the HKT adapter (aligners, learned gates): it is built, and attached to the child, before any
optimizer exists. The Trainer's own, `optimizer_cls_and_kwargs`, a user's optimizer without a scheduler (the adapter's
parameters are added as a group of its own) and one made over `trainer.model.parameters()` all include it; a user's
optimizer *and* scheduler made without it are refused with how to include it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

import helpers as H
from hkt_hf import HKTTrainer, HKTTrainingArguments


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


STEPS = dict(max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False)


def trainer_for(tmp_path, child: nn.Module | None = None, dataset=True, **kwargs) -> HKTTrainer:
    """A ResNet child and a wider parent (trainable aligners), learned gates: every adapter part has parameters."""
    hkt = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith("hkt_")}
    args = H.training_args(tmp_path, hkt_gate="learned", **STEPS, **hkt)
    return HKTTrainer(child if child is not None else H.tiny_resnet(8), args, parent_model=H.tiny_resnet(16, seed=1),
                      train_dataset=H.image_dataset(16) if dataset else None, **kwargs)


def trains_every_adapter_parameter(trainer: HKTTrainer) -> None:
    """Train; every adapter parameter (aligners both ways, learned gate) must have moved."""
    adapter = trainer.hkt_adapter
    before = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    assert before and any("to_child" in name for name in before) and any("gates" in name for name in before)
    trainer.train()
    assert trainer.hkt_adapter is adapter
    unchanged = [name for name, p in adapter.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []


def child_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if not name.startswith("hkt_adapter.")]


def test_the_adapter_is_attached_before_any_optimizer_exists(tmp_path):
    trainer = trainer_for(tmp_path)
    assert trainer.optimizer is None
    names = {name for name, _ in trainer.model.named_parameters()}
    assert {f"hkt_adapter.{name}" for name, _ in trainer.hkt_adapter.named_parameters()} <= names
    trains_every_adapter_parameter(trainer)
    assert not any(name.startswith("hkt_adapter.") for name, _ in trainer.model.named_parameters())


def test_optimizer_cls_and_kwargs_trains_the_adapter(tmp_path):
    trainer = trainer_for(tmp_path, optimizer_cls_and_kwargs=(torch.optim.Adam, {"lr": 1e-2}))
    trains_every_adapter_parameter(trainer)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert isinstance(trainer.optimizer.optimizer, torch.optim.Adam)
    assert {id(p) for p in trainer.hkt_adapter.parameters()} <= held


def test_a_user_optimizer_without_scheduler_gets_the_adapter_as_a_group_with_its_defaults(tmp_path):
    child = H.tiny_resnet(8)
    optimizer = torch.optim.SGD(child.parameters(), lr=0.05, momentum=0.9)
    trainer = trainer_for(tmp_path, child, optimizers=(optimizer, None))
    assert len(optimizer.param_groups) == 2  # added at construction, before the first step
    group = optimizer.param_groups[1]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.hkt_adapter.parameters()}
    assert (group["lr"], group["momentum"]) == (0.05, 0.9)
    trains_every_adapter_parameter(trainer)


def test_a_user_optimizer_is_completed_when_the_adapter_is_built_at_train(tmp_path):
    """No train_dataset at construction: the adapter is built at the start of train(), still before the Trainer
    prepares the optimizer and builds the scheduler."""
    child = H.tiny_resnet(8)
    optimizer = torch.optim.SGD(child.parameters(), lr=0.05)
    snapshot = H.AdapterAtTrainBegin()
    trainer = trainer_for(tmp_path, child, dataset=False, optimizers=(optimizer, None), callbacks=[snapshot])
    assert trainer.hkt_adapter is None
    trainer.train_dataset = H.image_dataset(16)
    trainer.train()
    assert len(optimizer.param_groups) == 2
    assert snapshot.before and snapshot.unchanged(trainer.hkt_adapter) == []


def test_a_user_optimizer_and_scheduler_without_the_adapter_are_refused(tmp_path):
    child = H.tiny_resnet(8)
    optimizer = torch.optim.SGD(child.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ValueError, match=r"lacks the \d+ trainable HKT adapter parameters.*"
                                         r"`optimizers=\(optimizer, None\)`.*`optimizer_cls_and_kwargs=.*"
                                         r"`trainer.model.parameters\(\)`"):
        trainer_for(tmp_path, child, optimizers=(optimizer, scheduler))


def test_an_optimizer_and_scheduler_made_after_the_trainer_train_the_adapter(tmp_path):
    """The way the refusal suggests: the trainer first, then the optimizer over `trainer.model.parameters()`."""
    trainer = trainer_for(tmp_path)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.05)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 0.5)
    trains_every_adapter_parameter(trainer)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.025]


def test_an_adapter_without_trainable_parameters_needs_nothing_from_the_optimizer(tmp_path):
    """Equal widths and a parameter-free gate: a user's optimizer and scheduler are taken as given."""
    child = H.tiny_resnet(8)
    optimizer = torch.optim.SGD(child.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = H.training_args(tmp_path, hkt_gate="genetic", **STEPS)
    trainer = HKTTrainer(child, args, parent_model=H.tiny_resnet(8, seed=1), train_dataset=H.image_dataset(16),
                         optimizers=(optimizer, scheduler))
    assert list(trainer.hkt_adapter.parameters()) == [] and len(optimizer.param_groups) == 1
    trainer.train()
    assert trainer.state.global_step == 2


def test_with_only_the_native_term_a_user_optimizer_updates_the_child_as_the_plain_trainer(tmp_path):
    """The group added for the adapter leaves the child's updates as the plain Trainer makes them with the same
    user optimizer (the scheduler the Trainer builds over both groups included)."""
    def run(trainer_class, args_class, **hkt):
        child = H.tiny_resnet(8)
        optimizer = torch.optim.SGD(child.parameters(), lr=0.05, momentum=0.9)
        common = dict(use_cpu=True, report_to="none", seed=0, save_strategy="no", lr_scheduler_type="linear", **STEPS)
        extra = dict(parent_model=H.tiny_resnet(16, seed=1)) if hkt else {}
        trainer = trainer_class(child, args_class(str(tmp_path / trainer_class.__name__), **common, **hkt),
                                train_dataset=H.image_dataset(16), optimizers=(optimizer, None), **extra)
        trainer.train()
        return child_params(child)

    plain = run(Trainer, TrainingArguments)
    hkt = run(HKTTrainer, HKTTrainingArguments, hkt_gate="learned", hkt_loss_weights=[1.0, 0.0, 0.0])
    for a, b in zip(plain, hkt, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
