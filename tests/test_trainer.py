"""HKTTrainer end to end: the loss against independent computations on the real CIFAR ResNets, `auto` carriers on
transformers classifiers, gradient accumulation, cleanup after training and after errors, saving and exact resume,
logging, and the two-name swap in a typical image-classification script.
"""

from __future__ import annotations

import copy
import json
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    DefaultDataCollator,
    HfArgumentParser,
    TrainerCallback,
)

import helpers as H
from hkt_hf import HKTTrainer, HKTTrainingArguments, cifar_image_processor
from hkt_hf.adapter import ADAPTER_WEIGHTS_NAME, HKTAdapter
from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint
from hkt_hf.lineage import HKT_CONFIG_NAME
from hkt_hf.apps.data.images import prepare_image_dataset, strided_subset
from hkt_hf.objective import HKTObjective, StepResult
from hkt_hf.transfer import Aligner, match_size

LAM = 0.6
AUTO_CARRIER = "classifier:input=classifier:input"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


# ---- the real CIFAR ResNets: compute_loss against an independent computation -----------------------------------


@pytest.fixture(scope="module")
def cifar_batch(cifar_test_split) -> dict[str, torch.Tensor]:
    """10 real test images (one per label), preprocessed without augmentation and collated."""
    subset = DatasetDict(test=strided_subset(cifar_test_split, 10))
    prepared = prepare_image_dataset(subset, cifar_image_processor())["test"]
    return DefaultDataCollator()([prepared[i] for i in range(len(prepared))])


@pytest.fixture(scope="module")
def imported_resnets(checkpoint_path) -> tuple[nn.Module, nn.Module]:
    return import_checkpoint(checkpoint_path("resnet20")), import_checkpoint(checkpoint_path("resnet56"))


@pytest.fixture()
def resnets(imported_resnets) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(child resnet20, parent resnet56 for the trainer, an independent copy of the parent for the hand computation)."""
    child, parent = imported_resnets
    return copy.deepcopy(child), copy.deepcopy(parent), copy.deepcopy(parent).eval()


def genetic_mix(q: torch.Tensor, p: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    """Reference Genetic Attention over dim 1 (channels), at every other position: m = q + lam (p - GA)."""
    a = torch.sigmoid((q * p).sum(1, keepdim=True) / math.sqrt(q.shape[1]))
    return q + lam * (p - (a * p + (1 - a) * q))


def hkt_trainer(child: nn.Module, parent: nn.Module, tmp_path, dataset=None, **overrides) -> HKTTrainer:
    """The trainer builds its adapter from its first training batch: CIFAR-sized images unless `dataset` is given."""
    values = dict(hkt_gate="genetic", hkt_lambda=LAM, remove_unused_columns=False) | overrides
    args = H.training_args(tmp_path, **values)
    dataset = dataset if dataset is not None else H.image_dataset(8, num_labels=10, size=32)
    return HKTTrainer(child, args, train_dataset=dataset, parent_model=parent)


def kd_reference(child_logits: torch.Tensor, parent_logits: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * mean over samples of sum_k p_k log(p_k / c_k), with p, c the softened parent and child distributions."""
    log_p, log_c = (parent_logits / t).log_softmax(1), (child_logits / t).log_softmax(1)
    return (log_p.exp() * (log_p - log_c)).sum(1).mean() * t * t


def test_auto_carrier_loss_equals_reference_objective(resnets, cifar_batch, tmp_path):
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path)
    assert trainer.hkt_lineage["hkt_carriers"] == [AUTO_CARRIER]
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)
    grads = torch.autograd.grad(loss, list(child.parameters()))

    pixels, labels = cifar_batch["pixel_values"], cifar_batch["labels"]
    q = child.resnet(pixels).pooler_output  # train mode, as in training
    with torch.no_grad():
        p = parent_ref.resnet(pixels).pooler_output
    assert q.shape == p.shape == (10, 64)
    m = genetic_mix(q, p)
    expected = (F.cross_entropy(child.classifier(q), labels) + F.cross_entropy(child.classifier(m), labels)
                + F.cross_entropy(parent_ref.classifier(m), labels))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    expected_grads = torch.autograd.grad(expected, list(child.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # In evaluation mode compute_loss is the plain child loss.
    child.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(child, cifar_batch),
                                   F.cross_entropy(child(pixel_values=pixels).logits, labels))


def test_loss_weights_and_kd_term(resnets, cifar_batch, tmp_path):
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path, hkt_loss_weights=[1.0, 0.5, 0.25], hkt_kd_weight=0.3,
                          hkt_kd_temperature=2.0)
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)
    pixels, labels = cifar_batch["pixel_values"], cifar_batch["labels"]
    q = child.resnet(pixels).pooler_output
    with torch.no_grad():
        p = parent_ref.resnet(pixels).pooler_output
    m = genetic_mix(q, p)
    expected = (F.cross_entropy(child.classifier(q), labels) + 0.5 * F.cross_entropy(child.classifier(m), labels)
                + 0.25 * F.cross_entropy(parent_ref.classifier(m), labels)
                + 0.3 * kd_reference(child.classifier(q), parent_ref.classifier(p), 2.0))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_kd_alone_trains_on_the_kd_term_only(resnets, cifar_batch, tmp_path):
    """Loss weights all zero with a KD weight: KL-only distillation, no task loss in the value or the gradient."""
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path, hkt_loss_weights=[0.0, 0.0, 0.0], hkt_kd_weight=0.3,
                          hkt_kd_temperature=2.0)
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)
    grads = torch.autograd.grad(loss, [p for p in child.parameters() if p.requires_grad])
    pixels = cifar_batch["pixel_values"]
    with torch.no_grad():
        parent_logits = parent_ref(pixel_values=pixels).logits
    expected = 0.3 * kd_reference(child(pixel_values=pixels).logits, parent_logits, 2.0)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, [p for p in child.parameters() if p.requires_grad])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"all zero is allowed only with hkt_kd_weight > 0"):
        HKTTrainingArguments(output_dir=str(tmp_path / "x"), hkt_loss_weights=[0.0, 0.0, 0.0])


def test_deep_map_carrier_loss_equals_hand_computation(resnets, cifar_batch, tmp_path):
    """layer3 -> layer3: the gate mixes per spatial position, then pooling and the heads run on the mixed map."""
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path, hkt_carriers=["resnet.layer3=resnet.layer3"])
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)
    assert not trainer._objective.replay

    pixels, labels = cifar_batch["pixel_values"], cifar_batch["labels"]
    q = child.resnet(pixels, output_hidden_states=True).hidden_states[-1]
    with torch.no_grad():
        p = parent_ref.resnet(pixels, output_hidden_states=True).hidden_states[-1]
    assert q.shape == p.shape == (10, 64, 8, 8)
    m = genetic_mix(q, p)
    expected = (F.cross_entropy(child.classifier(q.mean((2, 3))), labels)
                + F.cross_entropy(child.classifier(m.mean((2, 3))), labels)
                + F.cross_entropy(parent_ref.classifier(m.mean((2, 3))), labels))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_two_carriers_compose_downstream_in_both_networks(resnets, cifar_batch, tmp_path):
    """layer2 and layer3 at once: each network's layer3 runs on the mixed layer2 map, and its layer3 output is mixed
    again (the child's mixed pass mixes the feature it computed from m2, not the one of its plain pass)."""
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path, hkt_carriers=["resnet.layer2=resnet.layer2",
                                                                 "resnet.layer3=resnet.layer3"])
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)

    pixels, labels = cifar_batch["pixel_values"], cifar_batch["labels"]

    def stem_to_layer2(net: nn.Module) -> torch.Tensor:
        r = net.resnet
        return r.layer2(r.layer1(F.relu(r.bn1(r.conv1(pixels)))))

    q2 = stem_to_layer2(child)
    q3 = child.resnet.layer3(q2)
    with torch.no_grad():
        h2 = stem_to_layer2(parent_ref)
    m2 = genetic_mix(q2, h2)
    h3 = parent_ref.resnet.layer3(m2)
    m3_parent = genetic_mix(q3, h3)
    m3_child = genetic_mix(child.resnet.layer3(m2), h3)
    expected = (F.cross_entropy(child.classifier(q3.mean((2, 3))), labels)
                + F.cross_entropy(child.classifier(m3_child.mean((2, 3))), labels)
                + F.cross_entropy(parent_ref.classifier(m3_parent.mean((2, 3))), labels))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_deep_carrier_with_aligners_runs_the_parent_downstream(resnets, cifar_batch, tmp_path):
    """parent layer2 [32, 16, 16] -> child layer3 [64, 8, 8]: T is conv + pooling, T' conv + upsampling, and the
    parent-head term runs the parent's layer3 on T'(m)."""
    child, parent, parent_ref = resnets
    trainer = hkt_trainer(child, parent, tmp_path, hkt_carriers=["resnet.layer2=resnet.layer3"])
    child.train()
    loss = trainer.compute_loss(child, cifar_batch)
    adapter = child.hkt_adapter
    assert isinstance(adapter.to_child[0], Aligner) and adapter.to_child[0].dst_shape == (64, 8, 8)
    assert isinstance(adapter.to_parent[0], Aligner) and adapter.to_parent[0].dst_shape == (32, 16, 16)

    pixels, labels = cifar_batch["pixel_values"], cifar_batch["labels"]
    q = child.resnet(pixels, output_hidden_states=True).hidden_states[-1]
    with torch.no_grad():
        h = parent_ref.resnet(pixels, output_hidden_states=True).hidden_states[2]
    m = genetic_mix(q, match_size(adapter.to_child[0](h), q))
    parent_logits = parent_ref.classifier(parent_ref.resnet.layer3(match_size(adapter.to_parent[0](m), h)).mean((2, 3)))
    expected = (F.cross_entropy(child.classifier(q.mean((2, 3))), labels)
                + F.cross_entropy(child.classifier(m.mean((2, 3))), labels)
                + F.cross_entropy(parent_logits, labels))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in trainer.parent_model.parameters())


def test_train_bn_parent_keeps_batch_norm_in_train_mode(tmp_path):
    """hkt_parent_mode='train-bn' (the reference code's setting) must survive the trainer's shape probe."""
    child, parent = H.tiny_resnet(8), H.tiny_resnet(16, seed=1)
    dataset = H.image_dataset(16)
    trainer = hkt_trainer(child, parent, tmp_path, dataset, hkt_parent_mode="train-bn")
    norms = [m for m in parent.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    running_mean = norms[0].running_mean.clone()
    seen = []  # (parent.training, every norm training, parent frozen) as the parent's forward saw them
    hook = parent.register_forward_pre_hook(lambda module, args: seen.append(
        (module.training, all(m.training for m in norms), not any(p.requires_grad for p in module.parameters()))))
    child.train()
    trainer.compute_loss(child, trainer.data_collator([dataset[i] for i in range(8)]))
    hook.remove()
    assert seen[-1] == (False, True, True)  # the training pass (the first one is the no-grad shape probe)
    assert not torch.equal(norms[0].running_mean, running_mean)  # the parent pass used batch statistics
    # Outside the step the user's parent is as it was given (a model built from a config is in train mode).
    assert parent.training and all(p.requires_grad for p in parent.parameters())


# ---- `auto` carriers on transformers classifiers of different widths -------------------------------------------

AUTO_MODELS = {
    "resnet": (lambda: H.tiny_resnet(8), lambda: H.tiny_resnet(16, seed=1), nn.Conv2d),
    "vit": (lambda: H.tiny_vit(16), lambda: H.tiny_vit(32, seed=1), nn.Linear),
    "convnext": (lambda: H.tiny_convnext(8), lambda: H.tiny_convnext(16, seed=1), nn.Linear),
    "mobilenet_v2": (lambda: H.tiny_mobilenet_v2(0.35), lambda: H.tiny_mobilenet_v2(0.5, seed=1), nn.Linear),
    "bert": (lambda: H.tiny_bert(16, vocab_size=30), lambda: H.tiny_bert(32, vocab_size=30, seed=1), nn.Linear),
}


def tiny_dataset(name: str, n: int = 16):
    if name != "bert":
        return H.image_dataset(n)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 30, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 2} for i in range(n)]


@pytest.mark.parametrize("name", list(AUTO_MODELS))
def test_auto_carriers_build_aligners_that_receive_gradients(name, tmp_path):
    make_child, make_parent, proj_type = AUTO_MODELS[name]
    child, parent = make_child(), make_parent()
    dataset = tiny_dataset(name)
    trainer = hkt_trainer(child, parent, tmp_path, dataset, max_steps=1)
    assert trainer.carriers[0].child.module == "classifier" and trainer.carriers[0].child.where == "input"
    batch = trainer.data_collator([dataset[i] for i in range(8)])
    child.train()
    trainer.compute_loss(child, batch).backward()
    adapter = child.hkt_adapter
    for aligner in (adapter.to_child[0], adapter.to_parent[0]):
        assert isinstance(aligner, Aligner) and isinstance(aligner.proj, proj_type)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())
    assert trainer._objective.replay  # head-input carriers use the cheap head replay
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    result = trainer.train()
    assert math.isfinite(result.training_loss) and trainer.state.global_step == 1
    assert trainer.hkt_adapter is adapter
    assert any(not torch.equal(before[k], v) for k, v in adapter.state_dict().items())


# ---- gradient accumulation ---------------------------------------------------------------------------------------


class RecordedRun(NamedTuple):
    trainer: HKTTrainer
    steps: list[StepResult]  # what the objective returned for every (micro-)batch, in order


def recorded_vit_run(output_dir, **overrides) -> RecordedRun:
    """4 SGD steps of a dropout-free ViT pair, logging every 2 steps, recording each objective result.

    SGD rather than Adam: Adam turns the float noise of gradients that are zero in exact arithmetic (attention key
    biases) into full-size steps, so equal runs would differ there.
    """
    steps: list[StepResult] = []
    original = HKTObjective.__call__

    def recording_call(self, *args, **kwargs):
        steps.append(original(self, *args, **kwargs))
        return steps[-1]

    trainer = hkt_trainer(H.tiny_vit(16), H.tiny_vit(32, seed=1), output_dir, H.image_dataset(128), max_steps=4,
                          logging_steps=2, optim="sgd", **overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HKTObjective, "__call__", recording_call)
        trainer.train()
    return RecordedRun(trainer, steps)


@pytest.fixture(scope="module")
def accumulation_runs(tmp_path_factory) -> tuple[RecordedRun, RecordedRun]:
    """The same data as batches of 8 accumulated over 4 micro-steps, and as plain batches of 32."""
    small = recorded_vit_run(tmp_path_factory.mktemp("ga4"), per_device_train_batch_size=8,
                             gradient_accumulation_steps=4)
    big = recorded_vit_run(tmp_path_factory.mktemp("ga1"), per_device_train_batch_size=32)
    return small, big


def training_logs(trainer: HKTTrainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def test_gradient_accumulation_matches_one_big_batch(accumulation_runs):
    small, big = (run.trainer for run in accumulation_runs)
    logs_small, logs_big = training_logs(small), training_logs(big)
    assert len(logs_small) == len(logs_big) == 2
    keys = [k for k in logs_big[0] if k == "loss" or k.startswith("hkt/")]
    assert len(keys) == 6 and f"hkt/{AUTO_CARRIER}/gate_mean" in keys
    for ls, lb in zip(logs_small, logs_big):
        for key in keys:
            assert ls[key] == pytest.approx(lb[key], abs=1e-5), key
    for (name, a), b in zip(small.model.named_parameters(), big.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(small.hkt_adapter.parameters(), big.hkt_adapter.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("run_index", [0, 1], ids=["accumulated", "plain"])
def test_logged_hkt_values_are_means_over_the_logged_steps(accumulation_runs, run_index):
    trainer, steps = accumulation_runs[run_index]
    logs = training_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4] and len(steps) % 2 == 0
    for log, window in zip(logs, (steps[: len(steps) // 2], steps[len(steps) // 2:])):
        gates = [s.gates[AUTO_CARRIER] for s in window]
        assert log[f"hkt/{AUTO_CARRIER}/gate_mean"] == pytest.approx(np.mean([g.gate.mean().item() for g in gates]))
        assert log[f"hkt/{AUTO_CARRIER}/mix_weight_mean"] == pytest.approx(
            np.mean([g.weight.mean().item() for g in gates]))
        for part in ("native", "child_mixed", "parent_head"):
            assert log[f"hkt/loss_{part}"] == pytest.approx(np.mean([s.parts[part].item() for s in window]))
        # Each micro-batch's loss is normalised over the whole accumulated batch (num_items_in_batch), as the
        # plain Trainer's: the step's loss is their sum.
        accumulation = trainer.args.gradient_accumulation_steps
        assert log["loss"] == pytest.approx(np.mean([s.loss.item() for s in window]) * accumulation, abs=1e-4)
        # The genetic gate's weight is lambda * (1 - a) step by step, so also on average.
        assert log[f"hkt/{AUTO_CARRIER}/mix_weight_mean"] == pytest.approx(
            LAM * (1 - log[f"hkt/{AUTO_CARRIER}/gate_mean"]))


# ---- cleanup after training and after errors -----------------------------------------------------------------------


def assert_clean(trainer: HKTTrainer, child: nn.Module, untouched: nn.Module) -> None:
    assert H.hooked_modules(child) == [] and H.hooked_modules(trainer.parent_model) == []
    assert not hasattr(child, "hkt_adapter")
    assert list(child.state_dict()) == list(untouched.state_dict())
    assert isinstance(trainer.hkt_adapter, HKTAdapter)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> tuple[HKTTrainer, nn.Module, nn.Module]:
    """(trainer after train(), its child, an untouched copy of the child) with a learned gate and aligners."""
    child = H.tiny_vit(16)
    untouched = copy.deepcopy(child)
    trainer = hkt_trainer(child, H.tiny_vit(32, seed=1), tmp_path_factory.mktemp("learned"), H.image_dataset(32),
                          hkt_gate="learned")
    trainer.train()
    return trainer, child, untouched


def test_train_leaves_no_hooks_and_no_adapter(learned_run):
    trainer, child, untouched = learned_run
    assert_clean(trainer, child, untouched)
    assert any(not torch.equal(a, b) for a, b in zip(child.state_dict().values(), untouched.state_dict().values()))


class RaiseAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("callback failed at step 2")


def test_cleanup_after_exception_in_callback(tmp_path):
    child = H.tiny_vit(16)
    untouched = copy.deepcopy(child)
    trainer = hkt_trainer(child, H.tiny_vit(32, seed=1), tmp_path, H.image_dataset(32))
    trainer.add_callback(RaiseAtStep())
    with pytest.raises(RuntimeError, match="callback failed at step 2"):
        trainer.train()
    assert_clean(trainer, child, untouched)


def test_cleanup_after_exception_inside_the_hooked_child_pass(tmp_path):
    """compute_loss_func runs inside the child pass that carries the extraction hooks."""
    calls = []

    def failing_loss(outputs, labels, num_items_in_batch=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("loss failed on the third batch")
        return F.cross_entropy(outputs.logits, labels)

    child = H.tiny_vit(16)
    untouched = copy.deepcopy(child)
    args = H.training_args(tmp_path, remove_unused_columns=False)
    trainer = HKTTrainer(child, args, train_dataset=H.image_dataset(32), parent_model=H.tiny_vit(32, seed=1),
                         compute_loss_func=failing_loss)
    with pytest.raises(RuntimeError, match="loss failed on the third batch"):
        trainer.train()
    assert_clean(trainer, child, untouched)


def test_cleanup_after_exception_in_collator(tmp_path):
    collate = DefaultDataCollator()
    calls = []

    def failing_collator(features):
        calls.append(1)
        if len(calls) == 4:  # the first call is the trainer's shape probe
            raise RuntimeError("collator failed")
        return collate(features)

    child = H.tiny_vit(16)
    untouched = copy.deepcopy(child)
    args = H.training_args(tmp_path, remove_unused_columns=False)
    trainer = HKTTrainer(child, args, train_dataset=H.image_dataset(64), parent_model=H.tiny_vit(32, seed=1),
                         data_collator=failing_collator)
    with pytest.raises(RuntimeError, match="collator failed"):
        trainer.train()
    assert_clean(trainer, child, untouched)


# ---- saving, checkpoints and exact resume ----------------------------------------------------------------------


def test_save_model_writes_the_plain_child_and_hkt_config(learned_run, tmp_path):
    trainer, child, untouched = learned_run
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final")
    assert list(loaded.state_dict()) == list(untouched.state_dict())
    for key, value in child.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    config = json.loads((tmp_path / "final" / HKT_CONFIG_NAME).read_text())
    assert config["hkt_carriers"] == [AUTO_CARRIER] and config["hkt_gate"] == "learned" and config["hkt_lambda"] == LAM
    assert config["child_architecture"] == "ViTForImageClassification"


def resumable_run(tmp_path, resume: str | None = None) -> HKTTrainer:
    # Not a ViT: transformers 5.24 checkpoints rename ViT keys on save but not on resume, even with a plain Trainer.
    trainer = hkt_trainer(H.tiny_resnet(8), H.tiny_resnet(16, seed=1), tmp_path, H.image_dataset(64), max_steps=4,
                          save_strategy="steps", save_steps=2, hkt_gate="learned", optim="adamw_torch")
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_checkpoints_hold_the_plain_child_and_the_adapter_beside_it_and_resume_is_exact(tmp_path):
    full = resumable_run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    # model.safetensors is the plain child's, key for key; the adapter has a file of its own.
    assert set(load_file(checkpoint / "model.safetensors")) == set(H.tiny_resnet(8).state_dict())
    adapter_keys = set(load_file(checkpoint / ADAPTER_WEIGHTS_NAME))
    assert {"gates.0.lam_logit", "to_child.0.proj.weight"} <= adapter_keys
    assert (checkpoint / HKT_CONFIG_NAME).is_file()

    resumed = resumable_run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(full.hkt_adapter.state_dict().values(), resumed.hkt_adapter.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- the two-name swap in a typical image-classification script --------------------------------------------------


def test_typical_image_classification_script(tmp_path):
    (args,) = HfArgumentParser(HKTTrainingArguments).parse_args_into_dataclasses(args=[
        "--output_dir", str(tmp_path / "run"), "--hkt_gate", "static", "--hkt_carriers", "auto",
        "--hkt_loss_weights", "1", "0.5", "0.5", "--remove_unused_columns", "false", "--use_cpu", "true",
        "--per_device_train_batch_size", "16", "--num_train_epochs", "5", "--learning_rate", "1e-2",
        "--logging_steps", "3", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
        "--seed", "0",
    ])
    assert args.hkt_gate == "static" and args.hkt_carriers == ["auto"] and args.hkt_loss_weights == [1.0, 0.5, 0.5]
    raw = DatasetDict(train=H.color_image_dataset(48), test=H.color_image_dataset(24, seed=1))
    dataset = prepare_image_dataset(raw, cifar_image_processor(size=H.IMAGE_SIZE))
    child, parent = H.tiny_vit(16), H.tiny_vit(32, layers=2, seed=1)
    trainer = HKTTrainer(model=child, args=args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
                         data_collator=DefaultDataCollator(), compute_metrics=H.accuracy, parent_model=parent)
    before, after, prediction = H.train_between_child_only_evaluations(trainer, parent, dataset["test"])
    native = [h["hkt/loss_native"] for h in trainer.state.log_history if "loss" in h]
    assert native[-1] < 0.8 * native[0]
    assert after["eval_loss"] < 0.8 * before["eval_loss"] and after["eval_accuracy"] > before["eval_accuracy"]
    assert prediction.predictions.shape == (24, H.NUM_LABELS)
    batch = DefaultDataCollator()([dataset["test"][i] for i in range(8)])
    child.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(prediction.predictions[:8]),
                                   child(pixel_values=batch["pixel_values"]).logits, rtol=1e-4, atol=1e-5)
    trainer.save_model()
    loaded = AutoModelForImageClassification.from_pretrained(args.output_dir)
    assert type(loaded) is type(child)
    assert json.loads((tmp_path / "run" / HKT_CONFIG_NAME).read_text())["hkt_loss_weights"] == [1.0, 0.5, 0.5]
