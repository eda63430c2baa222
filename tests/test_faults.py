"""Faults and bad input that must never give a child that looks trained and is not (docs/reliability.md):
a second `train()` and an in-process resume train the adapter they use, a skipped batch leaves no trace, a broken
parent is named, and the user's parent object is left as it was given."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.objective import NonFiniteLossError


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def resnet_trainer(tmp_path, child=None, parent=None, callbacks=None, **args) -> HKTTrainer:
    """A ResNet child and a wider parent (trainable aligners), learned gate: every HKT part has parameters."""
    values = dict(max_steps=4, per_device_train_batch_size=4, hkt_gate="learned", optim="adamw_torch",
                  remove_unused_columns=False) | args
    return HKTTrainer(
        child if child is not None else H.tiny_resnet(8), H.training_args(tmp_path, **values),
        train_dataset=H.image_dataset(32), callbacks=callbacks,
        parent_model=parent if parent is not None else H.tiny_resnet(16, seed=1),
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.equal(before[k], v)}


class StopAt(TrainerCallback):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the end of optimizer step `step`, once."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.step = -1
            raise KeyboardInterrupt


# ---- a second train() and an in-process resume ------------------------------------------------------------------


def test_a_second_train_updates_every_parameter_as_the_plain_trainer_does(tmp_path):
    plain_child = H.tiny_resnet(8)
    plain = Trainer(plain_child, TrainingArguments(str(tmp_path / "plain"), use_cpu=True, report_to="none",
                                                   max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2),
                    train_dataset=H.image_dataset(32))
    plain.train()
    before = snapshot(plain_child)
    plain.train()
    plain_changed = changed(before, plain_child)
    assert {n for n, p in plain_child.named_parameters()} <= plain_changed

    trainer = resnet_trainer(tmp_path / "hkt")
    trainer.train()
    child, adapter = trainer.model, trainer.hkt_adapter
    before_child, before_adapter = snapshot(child), snapshot(adapter)
    trainer.train()
    assert trainer.hkt_adapter is adapter  # one adapter for the trainer's lifetime: the optimizer holds its tensors
    assert {n for n, p in child.named_parameters()} <= changed(before_child, child)
    assert {n for n, p in adapter.named_parameters()} <= changed(before_adapter, adapter)


def test_train_after_an_interruption_trains_the_adapter(tmp_path):
    trainer = resnet_trainer(tmp_path, callbacks=[StopAt(2)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    before = snapshot(trainer.hkt_adapter)
    trainer.train()
    assert {n for n, p in trainer.hkt_adapter.named_parameters()} <= changed(before, trainer.hkt_adapter)


def test_an_interrupted_run_resumed_in_the_same_process_equals_an_uninterrupted_run(tmp_path):
    save = dict(save_strategy="steps", save_steps=2, max_steps=6)
    reference = resnet_trainer(tmp_path / "reference", **save)
    reference.train()

    trainer = resnet_trainer(tmp_path / "interrupted", callbacks=[StopAt(3)], **save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train(resume_from_checkpoint=True)  # from checkpoint-2, in this process, with this trainer
    assert trainer.state.global_step == 6
    for (name, a), b in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(reference.hkt_adapter.state_dict().items(), trainer.hkt_adapter.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


# ---- skipped batches ----------------------------------------------------------------------------------------------


class NaNParentAt(TrainerCallback):
    """Makes the parent's pooled feature NaN at the given training steps (after the shape probe)."""

    def __init__(self, module: nn.Module, steps: set[int]):
        self.steps, self.state = steps, None
        self.handle = module.register_forward_hook(self.hook)

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def hook(self, module, args, output):
        if self.state is not None and self.state.global_step + 1 in self.steps:
            return output * float("nan")
        return None


def test_a_skipped_batch_leaves_no_trace_in_batch_norm_statistics(tmp_path):
    """The NaN reaches the losses only after both models' batch-norm layers saw the batch: restored, not kept."""
    child, parent = H.tiny_resnet(8), H.tiny_resnet(16, seed=1)
    norm = lambda model: [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # noqa: E731
    nan = NaNParentAt(parent.resnet.pooler, {2})
    stats: dict[int, list[torch.Tensor]] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stats[state.global_step] = [b.clone() for m in norm(child) + norm(parent) for b in m.buffers()]

    trainer = resnet_trainer(tmp_path, child, parent, callbacks=[nan, Record()], hkt_on_nonfinite="skip",
                             hkt_parent_mode="train-bn", max_steps=3)
    trainer.train()
    nan.handle.remove()
    assert trainer.hkt_skipped_batches == 1
    for before, after in zip(stats[1], stats[2]):  # step 2 was skipped
        assert torch.equal(before, after)
    assert all(torch.isfinite(t).all() for t in stats[3])
    with torch.no_grad():
        assert torch.isfinite(child.eval()(pixel_values=torch.randn(2, 3, 16, 16)).logits).all()


def test_a_run_where_most_batches_are_skipped_fails_loudly(tmp_path):
    parent = H.tiny_resnet(16, seed=1)
    nan = NaNParentAt(parent.resnet.pooler, {1, 2, 3, 4})
    trainer = resnet_trainer(tmp_path, parent=parent, callbacks=[nan], hkt_on_nonfinite="skip")
    with pytest.raises(NonFiniteLossError, match="4 of 4 batches had NaN/inf losses and were skipped"):
        trainer.train()
    nan.handle.remove()


# ---- a broken parent is named -----------------------------------------------------------------------------------


def test_a_parent_with_a_nan_weight_is_named_when_the_trainer_is_built(tmp_path):
    """Checked on the whole parent before it is placed (under ZeRO-3 each process then holds only a slice)."""
    parent = H.tiny_resnet(16, seed=1)
    with torch.no_grad():
        parent.classifier[-1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"The parent .* has non-finite values \(NaN or inf\) in 'classifier"):
        resnet_trainer(tmp_path, parent=parent)


def test_a_nan_parent_feature_is_blamed_on_the_parent(tmp_path):
    parent = H.tiny_resnet(16, seed=1)
    nan = NaNParentAt(parent.resnet.pooler, {2})
    trainer = resnet_trainer(tmp_path, parent=parent, callbacks=[nan])
    with pytest.raises(NonFiniteLossError, match=r"Step 2: .*the PARENT's feature of carrier 'classifier:input"):
        trainer.train()
    nan.handle.remove()


# ---- the user's parent object ---------------------------------------------------------------------------------


def test_the_users_parent_is_left_as_it_was_given(tmp_path):
    parent = H.tiny_resnet(16, seed=1).train()
    parent.resnet.embedder.requires_grad_(False)  # a mix of frozen and trainable parameters, in train mode
    grads = {n: p.requires_grad for n, p in parent.named_parameters()}
    modes = {n: m.training for n, m in parent.named_modules()}
    state, dtype = snapshot(parent), next(parent.parameters()).dtype
    resnet_trainer(tmp_path, parent=parent).train()
    assert {n: p.requires_grad for n, p in parent.named_parameters()} == grads
    assert {n: m.training for n, m in parent.named_modules()} == modes
    assert changed(state, parent) == set() and next(parent.parameters()).dtype == dtype
    assert all(p.grad is None for p in parent.parameters())


def test_trainers_sharing_a_parent_keep_their_own_parent_mode(tmp_path):
    """A `train-bn` trainer built first must not make a later `eval` run update the shared parent's statistics."""
    parent = H.tiny_resnet(16, seed=1)
    train_bn = resnet_trainer(tmp_path / "a", parent=parent, hkt_parent_mode="train-bn")
    evaluating = resnet_trainer(tmp_path / "b", parent=parent, hkt_parent_mode="eval")
    before = snapshot(parent)
    evaluating.train()
    assert changed(before, parent) == set()  # no batch-norm statistic moved
    train_bn.train()
    assert any("running_mean" in key for key in changed(before, parent))


def test_a_bf16_child_leaves_an_fp32_parent_in_fp32(tmp_path):
    parent = H.tiny_resnet(16, seed=1)
    child = copy.deepcopy(H.tiny_resnet(8)).to(torch.bfloat16)
    trainer = resnet_trainer(tmp_path, child=child, parent=parent, max_steps=2, bf16=True)
    trainer.train()
    assert all(p.dtype == torch.float32 for p in parent.parameters())
    assert all(torch.isfinite(p.float()).all() for p in child.parameters())


# ---- a carrier that yields no tensor ------------------------------------------------------------------------------


class NoneOutput(nn.Module):
    """A module returning None (e.g. a logging or side-effect module), wrapped around a real one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.inner(x)
        return None


def test_a_carrier_module_whose_output_is_none_is_named(tmp_path):
    child = H.tiny_resnet(8)
    child.probe = NoneOutput(nn.Identity())
    original = child.forward

    def forward(*args, **kwargs):
        child.probe(kwargs["pixel_values"])
        return original(*args, **kwargs)

    child.forward = forward
    with pytest.raises(TypeError, match=r"the output of the child's carrier module 'probe' \(carrier 'probe'\): it is "
                                        r"of type NoneType"):
        resnet_trainer(tmp_path, child=child, hkt_carriers=["resnet.pooler=probe"])  # its probe builds the adapter
