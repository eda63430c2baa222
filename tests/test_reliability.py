"""Reliability and safety: clear errors for bad input, the NaN/inf policies, exact resume after SIGKILL, no hooks or
adapters left behind, flat memory, and safe loading (see docs/reliability.md)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, Value
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TrainerCallback

import kill_resume_worker
from helpers import NUM_LABELS, hooked_modules, image_dataset, tiny_vit, training_args
from hkt_hf import CifarResNetConfig, CifarResNetForImageClassification, HKTTrainer
from hkt_hf.adapter import ADAPTER_NAME, ADAPTER_WEIGHTS_NAME
from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import load_reference_state_dict
from hkt_hf.checkpointing import COMPLETE_MARKER, is_complete
from hkt_hf.lineage import FORMAT_VERSION, HKT_CONFIG_NAME, read_lineage, write_lineage
from hkt_hf.apps.data.images import image_collator, prepare_image_dataset
from hkt_hf.apps.models import IMAGENET_MEAN, IMAGENET_STD, cifar_image_processor
from hkt_hf.objective import NonFiniteLossError

AUTO = "classifier:input=classifier:input"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU run ~10x faster on one thread; the kill/resume worker uses one thread too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def vit_pair(**child_kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Parent and child of different widths (trainable aligners between them)."""
    return tiny_vit(16, seed=1), tiny_vit(8, seed=2, **child_kw)


def trainer_for(tmp_path: Path, n: int = 16, parent=None, child=None, callbacks=None, data_collator=None,
                **args) -> HKTTrainer:
    default_parent, default_child = vit_pair()
    values = dict(per_device_train_batch_size=4, max_steps=4)
    values.update(args)
    return HKTTrainer(
        child if child is not None else default_child, training_args(tmp_path / "run", **values),
        train_dataset=image_dataset(n), parent_model=parent if parent is not None else default_parent,
        callbacks=callbacks, data_collator=data_collator,
    )


def assert_clean(*models: torch.nn.Module) -> None:
    """No forward hook or pre-hook on any module, and no HKT adapter attached."""
    for model in models:
        assert hooked_modules(model) == []
        assert not hasattr(model, ADAPTER_NAME)
        assert not any(name.startswith(ADAPTER_NAME) for name in model.state_dict())


# ------------------------------------------------------------------------------------------------- bad input


def test_unknown_carrier_module_lists_the_closest_names(tmp_path):
    with pytest.raises(ValueError) as err:
        trainer_for(tmp_path, hkt_carriers=["vit.layernorm=vit.layernrom"])
    message = str(err.value)
    assert "child" in message and "no module named 'vit.layernrom'" in message
    assert "Closest names: vit.layernorm" in message


def test_carrier_shapes_that_cannot_be_aligned(tmp_path):
    # Tokens [N, D] from the parent's last layer norm against the child's pooled head input [D].
    parent, child = vit_pair()
    with pytest.raises(ValueError) as err:  # at construction: the probe of the first batch builds the aligners
        trainer_for(tmp_path, parent=parent, child=child, hkt_carriers=["vit.layernorm=classifier:input"])
    message = str(err.value)
    assert "Cannot align carrier 'vit.layernorm=classifier:input'" in message
    assert "tokens [N, D]" in message and "vector [C]" in message
    assert "Pair modules whose outputs are of the same kind" in message
    assert_clean(parent, child)


def test_parent_with_other_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Parent has 5 labels, child has 3.*Use a parent fine-tuned on the child's"):
        trainer_for(tmp_path, parent=tiny_vit(16, num_labels=5))
    parent, child = vit_pair()
    parent.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    child.config.id2label = {0: "dog", 1: "cat", 2: "bird"}
    with pytest.raises(ValueError, match=r"Parent labels \['cat', 'dog', 'bird'\] differ .*align id2label first"):
        trainer_for(tmp_path, parent=parent, child=child)


def test_parent_for_another_task_is_refused(tmp_path):
    with pytest.raises(ValueError) as err:
        trainer_for(tmp_path, parent=tiny_vit(16).vit)  # a bare ViTModel: no classification task
    message = str(err.value)
    assert "ViTModel" in message and "ViTForImageClassification" in message and "different tasks" in message
    assert "same task with the same labels" in message


def test_parent_that_is_the_child_object_is_refused(tmp_path):
    child = tiny_vit(8)
    with pytest.raises(ValueError, match="parent is the child object itself; load a separate"):
        trainer_for(tmp_path, parent=child, child=child)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("hkt_lambda", 1.5, r"hkt_lambda must lie in \[0, 1\].*got 1.5"),
        ("hkt_lambda", -0.1, r"hkt_lambda must lie in \[0, 1\].*got -0.1"),
        ("hkt_lambda", float("nan"), r"hkt_lambda must be a finite number, got nan"),
        ("hkt_loss_weights", [1.0, -1.0, 1.0], r"must be non-negative.*got \[1.0, -1.0, 1.0\]"),
        ("hkt_loss_weights", [1.0, 1.0], r"must be 3 numbers.*got \[1.0, 1.0\]"),
        ("hkt_loss_weights", [0.0, 0.0, 0.0], r"not all zero"),
        ("hkt_loss_weights", [1.0, float("nan"), 1.0], r"hkt_loss_weights must be a finite number, got nan"),
        ("hkt_loss_weights", [1.0, float("inf"), 1.0], r"hkt_loss_weights must be a finite number, got inf"),
        ("hkt_gate", "gentic", r"hkt_gate must be one of 'genetic', 'agreement', 'constant', 'static', 'learned', got 'gentic'"),
        ("hkt_parent_mode", "train", r"hkt_parent_mode must be one of 'eval', 'train-bn', got 'train'"),
        ("hkt_kd_weight", -1.0, r"hkt_kd_weight must be >= 0"),
        ("hkt_kd_weight", float("nan"), r"hkt_kd_weight must be a finite number, got nan"),
        ("hkt_kd_temperature", float("inf"), r"hkt_kd_temperature must be a finite number, got inf"),
        ("hkt_kd_temperature", 0.0, r"hkt_kd_temperature must be > 0"),
        ("hkt_on_nonfinite", "ignore", r"hkt_on_nonfinite must be one of 'stop', 'skip'"),
        ("hkt_carriers", [], r"hkt_carriers must be a non-empty list"),
        ("hkt_parent", "./no/such/parent", r"hkt_parent='./no/such/parent' is neither an existing local folder"),
        ("hkt_parent_init_kwargs", "{dtype: bf16}", r"hkt_parent_init_kwargs must be a JSON object"),
    ],
)
def test_out_of_range_settings_are_refused_at_construction(tmp_path, field, value, expected):
    with pytest.raises(ValueError, match=expected):
        training_args(tmp_path, **{field: value})


def test_carriers_given_as_one_string_are_one_carrier(tmp_path):
    assert training_args(tmp_path, hkt_carriers="auto").hkt_carriers == ["auto"]


def test_output_dir_that_would_overwrite_the_parent_is_refused(tmp_path):
    parent_dir = tmp_path / "parent"
    parent_dir.mkdir()
    with pytest.raises(ValueError, match="is the parent's folder: saving the child would overwrite the parent"):
        training_args(parent_dir, hkt_parent=str(tmp_path / "." / "parent"))


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="training dataset is empty; HKT needs labelled training examples"):
        trainer_for(tmp_path, n=0)
    trainer = trainer_for(tmp_path)
    trainer.train_dataset = image_dataset(0)
    with pytest.raises(ValueError, match="training dataset is empty; HKT needs labelled training examples"):
        trainer.train()
    split = DatasetDict(train=Dataset.from_dict({"img": [], "label": []}))
    with pytest.raises(ValueError, match="Split 'train' of the dataset is empty"):
        prepare_image_dataset(split, cifar_image_processor())


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """What the CIFAR processor must give for a uniform image of colour `rgb` (0..255)."""
    return (torch.tensor(rgb) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def palette_image(rgb: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, *rgb])
    return image


def uniform_images() -> list[tuple[str, Image.Image, tuple[int, int, int]]]:
    """Images of every awkward mode and size, each of one colour, with the RGB colour they must come out as."""
    full = lambda shape, value, dtype=np.uint8: np.full(shape, value, dtype=dtype)  # noqa: E731
    return [
        ("grey", Image.fromarray(full((32, 32), 100), "L"), (100, 100, 100)),
        ("grey+alpha", Image.fromarray(full((32, 32, 2), 60), "LA"), (60, 60, 60)),
        ("rgba", Image.fromarray(np.dstack([full((32, 32, 3), [10, 120, 230]), full((32, 32), 7)]), "RGBA"),
         (10, 120, 230)),
        ("palette", palette_image((200, 50, 0)), (200, 50, 0)),
        ("1-bit", Image.new("1", (32, 32), 1), (255, 255, 255)),
        ("odd size 45x20", Image.fromarray(full((20, 45, 3), [30, 60, 90]), "RGB"), (30, 60, 90)),
        ("large 300x200", Image.fromarray(full((200, 300, 3), [90, 60, 30]), "RGB"), (90, 60, 30)),
        ("16-bit grey", Image.fromarray(full((32, 32), 257 * 180, np.uint16)), (180, 180, 180)),
    ]


def test_images_of_any_mode_and_size_are_converted_for_the_model():
    """Grey, alpha, palette, odd-size and 16-bit images become correct 3x32x32 inputs (16-bit ones used to saturate
    to white, because PIL's convert() clips at 255)."""
    cases = uniform_images()
    features = Features(img=ImageFeature(), label=Value("int64"))
    data = DatasetDict(test=Dataset.from_dict({"img": [c[1] for c in cases], "label": [0] * len(cases)}, features))
    prepared = prepare_image_dataset(data, cifar_image_processor())["test"]
    for (name, _, rgb), row in zip(cases, prepared):
        pixels = row["pixel_values"]
        assert pixels.shape == (3, 32, 32), name
        expected = normalised(rgb)[:, None, None].expand(3, 32, 32)
        torch.testing.assert_close(pixels, expected, atol=0.02, rtol=0, msg=name)


def prepared_array(array: np.ndarray) -> torch.Tensor:
    """`array` stored in a `pixel_values` column (as nested lists, the way `datasets` keeps arrays), then prepared."""
    data = DatasetDict(test=Dataset.from_dict({"pixel_values": [array], "label": [0]}))
    return prepare_image_dataset(data, cifar_image_processor())["test"][0]["pixel_values"]


def test_array_images_are_converted_or_refused_with_a_fix():
    green = np.zeros((32, 32, 3), dtype=np.uint8)
    green[..., 1] = 255
    expected = normalised((0, 255, 0))[:, None, None].expand(3, 32, 32)
    torch.testing.assert_close(prepared_array(green), expected, atol=0.02, rtol=0)
    torch.testing.assert_close(prepared_array(green.transpose(2, 0, 1)), expected, atol=0.02, rtol=0)  # C, H, W
    torch.testing.assert_close(prepared_array(green.astype(np.uint16) * 257), expected, atol=0.02, rtol=0)
    white = normalised((255, 255, 255))[:, None, None].expand(3, 32, 32)
    torch.testing.assert_close(prepared_array(green[..., 1]), white, atol=0.02, rtol=0)  # grey H, W
    for bad, described in ((green / 255.0, "shape (32, 32, 3) and dtype float64"),
                           (np.zeros((32, 32, 2), np.uint8), "array of shape (32, 32, 2)")):
        with pytest.raises(ValueError) as err:
            prepared_array(bad)
        assert described in str(err.value) and "astype('uint8')" in str(err.value)


def test_processor_for_other_channel_count_is_refused_up_front(tiny_cifar):
    with pytest.raises(ValueError) as err:
        prepare_image_dataset(tiny_cifar, cifar_image_processor(), num_channels=1)
    message = str(err.value)
    assert "normalises 3 channels" in message and "num_channels=1" in message and "pass num_channels=3" in message


def test_mixed_mode_images_train_end_to_end(tmp_path):
    """Awkward images go through prepare_image_dataset, the processor and an HKT step of models sized for them."""
    cases = uniform_images()
    features = Features(img=ImageFeature(), label=Value("int64"))
    labels = [i % NUM_LABELS for i in range(len(cases))]
    data = DatasetDict(train=Dataset.from_dict({"img": [c[1] for c in cases], "label": labels}, features))
    prepared = prepare_image_dataset(data, cifar_image_processor(size=16))
    parent, child = vit_pair()
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, remove_unused_columns=False)
    trainer = HKTTrainer(child, args, train_dataset=prepared["train"], data_collator=image_collator(),
                         parent_model=parent)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(np.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_corrupt_or_truncated_reference_checkpoint(tmp_path, checkpoint_path):
    data = checkpoint_path("resnet20").read_bytes()
    truncated, garbage = tmp_path / "truncated.th", tmp_path / "garbage.th"
    truncated.write_bytes(data[: len(data) // 3])
    garbage.write_bytes(b"not a checkpoint" * 64)
    for path in (truncated, garbage):
        with pytest.raises(ValueError) as err:
            load_reference_state_dict(path)
        assert f"Could not read checkpoint {path}" in str(err.value)


def test_truncated_training_checkpoint_is_refused_on_resume(tmp_path):
    trainer = trainer_for(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    weights = Path(trainer.args.output_dir) / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    resumed = trainer_for(tmp_path, save_strategy="steps", save_steps=2, max_steps=6)
    with pytest.raises(ValueError) as err:
        resumed.train(resume_from_checkpoint=True)
    message = str(err.value)
    assert f"Cannot read checkpoint weights {weights}" in message and "truncated or corrupt" in message
    assert "Resume from an earlier checkpoint" in message
    assert_clean(resumed.parent_model, resumed.model)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"format_version": FORMAT_VERSION + 1}, rf"format_version {FORMAT_VERSION + 1}; this hkt-hf reads versions 1..{FORMAT_VERSION}. Upgrade hkt-hf"),
        ({"format_version": "one"}, r"format_version 'one'.*Upgrade hkt-hf"),
        ({"hkt_tokens_per_gate": 4}, r"Unknown HKT settings \['hkt_tokens_per_gate'\]"),
        ({"hkt_kd_weight": -1.0}, r"not a valid lineage record: hkt_kd_weight must be >= 0"),
    ],
)
def test_hkt_config_from_a_newer_or_unknown_format(tmp_path, change, expected):
    record = {"format_version": FORMAT_VERSION, "child_architecture": "ViTForImageClassification",
              "hkt_parent": "org/parent", "hkt_gate": "genetic", "hkt_lambda": 0.6}
    path = write_lineage({**record, **change}, tmp_path)
    with pytest.raises(ValueError, match=expected):
        read_lineage(path)


def test_hkt_config_that_is_not_json(tmp_path):
    path = tmp_path / HKT_CONFIG_NAME
    path.write_text('{"gate": "genetic",')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        read_lineage(path)


# ------------------------------------------------------------------------------------------------- numerical faults


class NaNAtStep(TrainerCallback):
    """Turns `module`'s output into NaN in the forwards of training step `at` (1-based). For a child module, only in
    train mode: the trainer's eval-mode checks of a batch (loss normalisation) are left alone; a parent module runs in
    eval mode (`train_mode_only=False`)."""

    def __init__(self, module: torch.nn.Module, at: int, train_mode_only: bool = True):
        self.at, self.step, self.train_mode_only = at, 0, train_mode_only
        self.handle = module.register_forward_hook(self.hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def hook(self, module, args, output):
        return output * float("nan") if self.step == self.at and (module.training or not self.train_mode_only) else None


def test_nonfinite_stop_names_step_and_carrier_and_keeps_checkpoints(tmp_path):
    parent, child = vit_pair()
    nan = NaNAtStep(child.vit.layernorm, at=3)
    trainer = trainer_for(tmp_path, parent=parent, child=child, callbacks=[nan], hkt_gate="learned",
                          save_strategy="steps", save_steps=2, max_steps=6)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    nan.handle.remove()
    message = str(err.value)
    assert message.startswith("Step 3: non-finite values (NaN or inf) in")
    assert "loss part 'native'" in message and f"child feature of carrier '{AUTO}'" in message
    assert "Training stopped; saved checkpoints are intact" in message and "hkt_on_nonfinite='skip'" in message
    assert_clean(parent, child)
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    assert is_complete(checkpoint)
    assert sorted(p.name for p in Path(trainer.args.output_dir).iterdir()) == ["checkpoint-2"]
    weights = load_file(str(checkpoint / "model.safetensors"))
    # The plain child's weights (ViT saves them under its legacy names): as many, none of the adapter's.
    assert len(weights) == len(vit_pair()[1].state_dict()) and not any(k.startswith(ADAPTER_NAME) for k in weights)
    adapter = load_file(str(checkpoint / ADAPTER_WEIGHTS_NAME))
    assert adapter and all(torch.isfinite(v).all() for v in [*weights.values(), *adapter.values()])


class WeightRecorder(TrainerCallback):
    """Copies of the child's parameters at the end of every optimizer step."""

    def __init__(self):
        self.by_step: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = [p.detach().flatten() for n, p in model.named_parameters() if not n.startswith(ADAPTER_NAME)]
        self.by_step[state.global_step] = torch.cat(params).clone()


def test_nonfinite_skip_drops_the_batch_and_logs_it(tmp_path):
    recorder, (parent, child) = WeightRecorder(), vit_pair()
    nan = NaNAtStep(parent.vit.layernorm, at=4, train_mode_only=False)  # a NaN parent feature poisons the mixed feature
    trainer = trainer_for(tmp_path, parent=parent, child=child, callbacks=[recorder, nan], hkt_on_nonfinite="skip",
                          hkt_gate="learned", max_steps=6)
    trainer.train()
    nan.handle.remove()
    assert trainer.state.global_step == 6 and trainer.hkt_skipped_batches == 1
    torch.testing.assert_close(recorder.by_step[4], recorder.by_step[3], rtol=0, atol=0)  # the skipped step
    assert not torch.equal(recorder.by_step[5], recorder.by_step[4])
    assert all(torch.isfinite(p).all() for p in child.parameters())
    assert all(torch.isfinite(p).all() for p in trainer.hkt_adapter.parameters())
    skipped = [log["hkt/skipped_batches"] for log in trainer.state.log_history if "hkt/skipped_batches" in log]
    assert skipped == [1, 1, 1]  # logged from the skipped step 4 on (logging_steps=1)
    assert_clean(parent, child)


# ------------------------------------------------------------------------------------------------- interruption


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = kill_resume_worker.run(tmp_path / "reference")
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = Path(kill_resume_worker.__file__)
    proc = subprocess.run(
        [sys.executable, str(worker), str(killed_dir), "--kill-on-save", "8"], env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # checkpoint-8 has every file but no completion marker: its save was cut short.
    assert is_complete(killed_dir / "checkpoint-4")
    assert (killed_dir / "checkpoint-8" / "model.safetensors").is_file()
    assert not (killed_dir / "checkpoint-8" / COMPLETE_MARKER).exists()
    assert not (killed_dir / kill_resume_worker.FINAL).exists()

    half_written = kill_resume_worker.build_trainer(killed_dir)
    with pytest.raises(ValueError) as err:
        half_written.train(resume_from_checkpoint=str(killed_dir / "checkpoint-8"))
    assert "is not a complete checkpoint" in str(err.value)
    assert f"Resume from {killed_dir / 'checkpoint-4'} instead" in str(err.value)

    resumed = kill_resume_worker.run(killed_dir, resume=True)  # True skips the unmarked checkpoint-8
    for name in ("model.safetensors", "adapter.safetensors"):
        expected, actual = load_file(str(reference / name)), load_file(str(resumed / name))
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs after resume"


def test_resume_true_without_a_complete_checkpoint(tmp_path):
    trainer = trainer_for(tmp_path)
    half = Path(trainer.args.output_dir) / "checkpoint-2"
    half.mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no complete HKT checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------------------- hook hygiene


def test_no_hooks_or_adapter_after_train(tmp_path):
    parent, child = vit_pair()
    keys = set(child.state_dict())
    trainer = trainer_for(tmp_path, parent=parent, child=child,
                          hkt_carriers=["vit.embeddings=vit.embeddings", "vit.layers.0=vit.layers.0"])
    trainer.train()
    assert_clean(trainer.parent_model, trainer.model)
    assert set(trainer.model.state_dict()) == keys and trainer.hkt_adapter is not None


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error


def test_no_hooks_after_an_exception_inside_a_step(tmp_path):
    trainer = trainer_for(tmp_path, hkt_carriers=["vit.layers.0=vit.layers.0"])
    parent, child = trainer.parent_model, trainer.model
    calls = []

    def fail_on_second_step(module, args, output):  # runs while the HKT extraction hooks are attached
        calls.append(module.training)
        if calls.count(True) == 2:
            raise RuntimeError("boom in the child's forward")

    handle = child.vit.layernorm.register_forward_hook(fail_on_second_step)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    handle.remove()
    assert_clean(parent, child)
    assert trainer.hkt_adapter is not None and torch.is_grad_enabled()


def test_no_hooks_after_keyboard_interrupt_from_a_callback(tmp_path):
    trainer = trainer_for(tmp_path, callbacks=[RaiseAtStep(2, KeyboardInterrupt())])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 2
    assert_clean(trainer.parent_model, trainer.model)


def test_no_hooks_after_keyboard_interrupt_from_the_collator(tmp_path):
    batches = []

    def collate(rows):
        batches.append(len(rows))
        if len(batches) == 6:  # the probe batch, then the Trainer's batches (it may fetch ahead)
            raise KeyboardInterrupt
        return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}

    trainer = trainer_for(tmp_path, data_collator=collate, max_steps=8)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert 0 < trainer.state.global_step < 8, "interrupted mid-training"
    assert_clean(trainer.parent_model, trainer.model)


class MemoryProbe(TrainerCallback):
    """Live tensor counts at chosen steps, and the longest pending HKT log buffer seen."""

    def __init__(self, trainer: HKTTrainer, steps: tuple[int, ...]):
        self.trainer, self.steps = trainer, steps
        self.tensors: dict[int, int] = {}
        self.longest_buffer = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.longest_buffer = max([self.longest_buffer, *map(len, self.trainer._hkt_logs.values())])
        if state.global_step in self.steps:
            gc.collect()
            self.tensors[state.global_step] = sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


def test_memory_stays_flat_over_300_steps(tmp_path):
    logging_steps = 50
    trainer = trainer_for(tmp_path, n=64, max_steps=300, logging_steps=logging_steps, hkt_gate="learned")
    probe = MemoryProbe(trainer, steps=(50, 300))
    trainer.add_callback(probe)
    trainer.train()
    assert 0 < probe.longest_buffer <= logging_steps
    assert probe.tensors[300] - probe.tensors[50] <= 20, probe.tensors
    assert len(trainer._hkt_logs) == 0  # step 300 was a logging step: everything pending was flushed


# ------------------------------------------------------------------------------------------------- safe loading


def test_save_model_writes_safetensors_and_reloads_without_remote_code(tmp_path):
    child = CifarResNetForImageClassification(CifarResNetConfig(depth=8, hidden_sizes=[4, 8, 16], num_labels=3))
    parent = CifarResNetForImageClassification(CifarResNetConfig(depth=8, hidden_sizes=[8, 16, 32], num_labels=3))
    trainer = trainer_for(tmp_path, parent=parent, child=child, max_steps=2)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", HKT_CONFIG_NAME} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files - {"training_args.bin"})
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForImageClassification.from_pretrained(out)  # no trust_remote_code
    assert type(reloaded) is CifarResNetForImageClassification
    for key, value in child.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert not any(name.endswith(".bin") and name != "training_args.bin"
                   for ckpt in Path(trainer.args.output_dir).glob("checkpoint-*") for name in os.listdir(ckpt))


class Payload:
    """A pickled object whose unpickling runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_arbitrary_object_needs_allow_pickle(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.th"
    state = {"linear.weight": torch.zeros(2, 2)}
    torch.save({"state_dict": state, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError) as err:
        load_reference_state_dict(path)
    assert "If you trust its origin and it holds Python objects, pass allow_pickle=True" in str(err.value)
    assert not marker.exists()  # refused before running anything
    assert load_reference_state_dict(path, allow_pickle=True).keys() == state.keys()
    assert marker.exists()  # the explicit opt-in is what runs pickled code
