"""`model_init=`: as with the plain Trainer, every `train()` trains a fresh child from `model_init`; HKT gives each
new child its own carriers and adapter before the Trainer makes the optimizer, and a resume loads the checkpoint's
adapter state into it."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.adapter import get_adapter

VOCAB = 30
STEPS = dict(max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def token_rows(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2} for i in range(n)]


def resnet_init() -> torch.nn.Module:
    return H.tiny_resnet(8)


def resnet_trainer(tmp_path, callbacks=None, **overrides) -> HKTTrainer:
    """A ResNet child from `model_init`, a wider parent (trainable aligners), learned gates."""
    args = H.training_args(tmp_path, hkt_gate="learned", **(STEPS | overrides))
    return HKTTrainer(model_init=resnet_init, args=args, parent_model=H.tiny_resnet(16, seed=1),
                      train_dataset=H.image_dataset(16), callbacks=callbacks)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_model_init_trains_the_child_and_its_adapter(tmp_path):
    snapshot = H.AdapterAtTrainBegin()
    trainer = resnet_trainer(tmp_path, callbacks=[snapshot])
    first = trainer.model, trainer.hkt_adapter
    trainer.train()
    child, adapter = trainer.model, trainer.hkt_adapter
    assert child is not first[0] and adapter is not first[1]  # a new child and its own adapter, detached after
    assert get_adapter(child) is None and get_adapter(first[0]) is None
    fresh = resnet_init()
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in child.state_dict().items())
    assert snapshot.before and snapshot.unchanged(adapter) == []


def test_model_init_with_only_the_native_term_equals_the_plain_trainer(tmp_path):
    """Dropout in the child: the adapter's probe and initialisation draw nothing from the random stream that the
    Trainer's set_seed / model_init / training steps use, so the children are equal bit for bit."""
    def init():
        return H.tiny_bert(16, vocab_size=VOCAB, dropout=0.1)

    common = dict(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to="none", seed=0, save_strategy="no",
                  per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1)
    plain = Trainer(model_init=init, args=TrainingArguments(**common), train_dataset=token_rows())
    plain.train()
    args = H.training_args(**(common | dict(output_dir=str(tmp_path / "hkt"))), hkt_loss_weights=[1.0, 0.0, 0.0],
                           hkt_gate="learned")
    hkt = HKTTrainer(model_init=init, args=args, parent_model=H.tiny_bert(32, vocab_size=VOCAB, seed=1),
                     train_dataset=token_rows())
    hkt.train()
    assert_same(state(plain.model), state(hkt.model))
    losses = [[h["loss"] for h in trainer.state.log_history if "loss" in h] for trainer in (plain, hkt)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_each_train_gets_a_fresh_child_and_adapter_that_its_optimizer_trains(tmp_path):
    """Two train() calls: two new children and adapters; the same seed gives the same run twice, which holds only if
    the second run's optimizer trains the second adapter."""
    trainer = resnet_trainer(tmp_path)
    trainer.train()
    child1, adapter1 = trainer.model, trainer.hkt_adapter
    trained1 = state(child1), state(adapter1)
    trainer.train()
    child2, adapter2 = trainer.model, trainer.hkt_adapter
    assert child2 is not child1 and adapter2 is not adapter1
    assert get_adapter(child1) is None and get_adapter(child2) is None
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in adapter2.parameters()} <= held and not {id(p) for p in adapter1.parameters()} & held
    assert_same(trained1[0], state(child2))
    assert_same(trained1[1], state(adapter2))


def test_a_resumed_model_init_run_equals_the_uninterrupted_one(tmp_path):
    save = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = resnet_trainer(tmp_path / "full", **save)
    full.train()
    resumed = resnet_trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert_same(state(full.model), state(resumed.model))
    assert_same(state(full.hkt_adapter), state(resumed.hkt_adapter))


def test_children_of_another_architecture_get_their_own_carriers(tmp_path):
    """`model_init` may change the architecture (as a hyperparameter search over depth does): `blocks` is resolved
    for each child, and the lineage records the child that was trained."""
    depths = iter([1, 2])

    def init():
        return H.tiny_vit(16, layers=next(depths))

    args = H.training_args(tmp_path, hkt_carriers="blocks", **STEPS)
    trainer = HKTTrainer(model_init=init, args=args, parent_model=H.tiny_vit(32, layers=4, seed=1),
                         train_dataset=H.image_dataset(16))
    assert trainer.hkt_lineage["hkt_carriers"] == ["vit.layers.3=vit.layers.0"]
    trainer.train()
    assert len(trainer.model.vit.layers) == 2
    assert [str(c) for c in trainer.carriers] == ["vit.layers.1=vit.layers.0", "vit.layers.3=vit.layers.1"]
    assert trainer.hkt_lineage["hkt_carriers"] == [str(c) for c in trainer.carriers]
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert "hkt/vit.layers.3=vit.layers.1/gate_mean" in log
