"""Checkpoints and resume under faults (docs/reliability.md, "Checkpoints and resume"): a damaged adapter state file,
a run with another objective or parent, a folder reused by a second run, a save some process did not finish, a plain
Trainer checkpoint, stale files in a final folder, and the best model restored for every architecture.

Every refusal happens before the first step and names the file or the settings. Also runnable under
`torchrun --nproc_per_node 2 tests/test_resume_faults.py OUT` (the two-process save test launches it so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers as H  # noqa: E402

from hkt_hf import HKTTrainer  # noqa: E402
from hkt_hf.adapter import ADAPTER_WEIGHTS_NAME  # noqa: E402
from hkt_hf.checkpointing import COMPLETE_MARKER, is_complete, mark_complete, verify_checkpoint  # noqa: E402
from hkt_hf.lineage import (  # noqa: E402
    FORMAT_VERSION,
    HKT_CONFIG_NAME,
    format_lineage,
    parent_fingerprint,
    read_lineage,
)
from hkt_hf.compat import load_runtime_state_dict  # noqa: E402

CARRIER = "vit.layers.0=vit.layers.0"
SAME_SHAPE_CARRIER = "vit.embeddings=vit.embeddings"  # [17, width] like CARRIER: an adapter of the same shapes


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with H.one_torch_thread():
        yield


def vit_trainer(output_dir: Path, parent=..., child=None, callbacks=None, **args) -> HKTTrainer:
    """Tiny ViTs of different widths (trainable aligners), learned gate, a checkpoint every 2 steps. `parent=None`
    loads the parent named by `hkt_parent`."""
    values = dict(per_device_train_batch_size=4, max_steps=2, save_strategy="steps", save_steps=2,
                  hkt_carriers=[CARRIER], hkt_gate="learned") | args
    return HKTTrainer(
        child if child is not None else H.tiny_vit(8, seed=2), H.training_args(output_dir, **values),
        train_dataset=H.image_dataset(16), callbacks=callbacks,
        parent_model=H.tiny_vit(16, seed=1) if parent is ... else parent,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """output_dir of a 2-step run with a complete checkpoint-2; tests work on copies (`run_copy`)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    vit_trainer(out).train()
    assert is_complete(out / "checkpoint-2")
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def refused(trainer: HKTTrainer, resume) -> str:
    """The message of the ValueError that `train(resume_from_checkpoint=resume)` raises before any step."""
    with pytest.raises(ValueError) as err:
        trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 0
    return str(err.value)


def use_legacy_marker(checkpoint: Path) -> None:
    """The marker of hkt-hf before manifests, which lists nothing: the files themselves must still be checked."""
    (checkpoint / COMPLETE_MARKER).write_text("complete\n")


# ---- 1. a damaged hkt_adapter.safetensors --------------------------------------------------------------------------


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes, same size":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "random bytes":
        path.write_bytes(os.urandom(100))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere.safetensors")
    elif how == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()
    else:
        assert how == "missing"


DAMAGES = ["missing", "truncated", "random bytes, same size", "random bytes", "empty", "dangling symlink",
           "symlink to /dev/zero", "fifo", "directory"]


@pytest.fixture
def no_hang():
    """Fails a test that blocks (e.g. by opening a FIFO) instead of hanging the suite."""
    def timeout(*_):
        raise TimeoutError("blocked reading a checkpoint file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("marker", ["manifest", "legacy"])
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_adapter_state_is_refused_naming_it(run_copy, tmp_path, how, marker, no_hang):
    checkpoint = run_copy / "checkpoint-2"
    if marker == "legacy":
        use_legacy_marker(checkpoint)
    path = checkpoint / ADAPTER_WEIGHTS_NAME
    _damage(path, how, tmp_path)
    message = refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))
    assert str(path) in message, message
    assert "earlier" in message


def test_marking_a_checkpoint_without_its_adapter_state_unmarks_it(run_copy):
    checkpoint = run_copy / "checkpoint-2"
    (checkpoint / ADAPTER_WEIGHTS_NAME).unlink()
    assert not mark_complete(checkpoint) and not is_complete(checkpoint)
    message = refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))
    assert f"it lacks {checkpoint / ADAPTER_WEIGHTS_NAME}" in message, message


class Unreadable:
    """Makes `open` of one path fail as a file without read permission does (root reads anything, so chmod cannot)."""

    def __init__(self, monkeypatch, path: Path):
        self.path, self.real_open = str(path), open
        for module in ("hkt_hf.checkpointing", "hkt_hf.adapter"):
            monkeypatch.setattr(f"{module}.open", self, raising=False)
        monkeypatch.setattr(Path, "read_bytes", lambda p: self.read_bytes(p))

    def read_bytes(self, path: Path) -> bytes:
        with self(path, "rb") as f:
            return f.read()

    def __call__(self, file, *args, **kwargs):
        if str(file) == self.path:
            raise PermissionError(13, "Permission denied", self.path)
        return self.real_open(file, *args, **kwargs)


@pytest.mark.parametrize("marker", ["manifest", "legacy"])
def test_an_unreadable_adapter_state_is_refused_naming_it(run_copy, monkeypatch, marker):
    checkpoint = run_copy / "checkpoint-2"
    if marker == "legacy":
        use_legacy_marker(checkpoint)
    path = checkpoint / ADAPTER_WEIGHTS_NAME
    if os.geteuid() == 0:
        Unreadable(monkeypatch, path)
    else:
        path.chmod(0)
    message = refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))
    assert str(path) in message and "Permission denied" in message, message


def test_an_adapter_without_parameters_still_has_its_file_and_needs_it(tmp_path):
    """Same widths (identity aligners) and the genetic gate: nothing to train, yet the file is written and required,
    so every HKT checkpoint looks the same."""
    same = dict(parent=H.tiny_vit(8, seed=1), hkt_gate="genetic")
    vit_trainer(tmp_path / "run", **same).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert load_file(checkpoint / ADAPTER_WEIGHTS_NAME) == {}
    resumed = vit_trainer(tmp_path / "run", max_steps=4, **same)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    (checkpoint / ADAPTER_WEIGHTS_NAME).unlink()
    assert str(checkpoint / ADAPTER_WEIGHTS_NAME) in refused(vit_trainer(tmp_path / "run", **same), str(checkpoint))


# ---- 2. another objective or parent --------------------------------------------------------------------------------


OBJECTIVE_CHANGES = [
    ({"hkt_gate": "genetic"}, "hkt_gate: 'learned' -> 'genetic'"),
    ({"hkt_carriers": [SAME_SHAPE_CARRIER]}, f"hkt_carriers: ['{CARRIER}'] -> ['{SAME_SHAPE_CARRIER}']"),
    ({"hkt_loss_weights": [1.0, 0.5, 1.0]}, "hkt_loss_weights: [1.0, 1.0, 1.0] -> [1.0, 0.5, 1.0]"),
    ({"hkt_lambda": 0.3}, "hkt_lambda: 0.6 -> 0.3"),
    ({"hkt_kd_weight": 0.5}, "hkt_kd_weight: 0.0 -> 0.5"),
    ({"hkt_kd_temperature": 2.0}, "hkt_kd_temperature: 4.0 -> 2.0"),
    ({"hkt_kd_loss": "mse"}, "hkt_kd_loss: 'kl' -> 'mse'"),
    ({"hkt_hint_weight": 0.5}, "hkt_hint_weight: 0.0 -> 0.5"),
    ({"hkt_parent_mode": "train-bn"}, "hkt_parent_mode: 'eval' -> 'train-bn'"),
    ({"hkt_gate": "static", "hkt_lambda": 0.3}, "hkt_lambda: 0.6 -> 0.3"),
]


@pytest.mark.parametrize("resume_true", [False, True])
@pytest.mark.parametrize(("change", "expected"), OBJECTIVE_CHANGES)
def test_a_resume_with_another_objective_is_refused_listing_old_and_new(run_copy, change, expected, resume_true):
    checkpoint = run_copy / "checkpoint-2"
    message = refused(vit_trainer(run_copy, max_steps=4, **change), True if resume_true else str(checkpoint))
    assert expected in message, message
    assert f"{checkpoint}: this run's HKT settings differ" in message
    assert f"from_pretrained('{checkpoint}')" in message and "without resume_from_checkpoint" in message


def test_a_resume_with_another_parent_object_is_refused(run_copy):
    message = refused(vit_trainer(run_copy, parent=H.tiny_vit(16, seed=7), max_steps=4), True)
    assert "parent_sha256: '" in message and " -> '" in message, message


def test_another_parent_at_the_same_path_is_refused_and_a_moved_one_accepted(tmp_path):
    parent_dir = tmp_path / "parent"
    H.tiny_vit(16, seed=1).save_pretrained(parent_dir)
    run = tmp_path / "run"
    first = vit_trainer(run, parent=None, hkt_parent=str(parent_dir))
    first.train()
    recorded = read_lineage(run / "checkpoint-2" / HKT_CONFIG_NAME)
    assert recorded["parent_sha256"] == first.hkt_lineage["parent_sha256"] is not None

    moved = tmp_path / "moved"
    shutil.copytree(parent_dir, moved)
    H.tiny_vit(16, seed=7).save_pretrained(parent_dir)  # other weights, same path
    message = refused(vit_trainer(run, parent=None, hkt_parent=str(parent_dir), max_steps=4), True)
    assert f"parent_sha256: '{recorded['parent_sha256']}' -> '" in message, message

    resumed = vit_trainer(run, parent=None, hkt_parent=str(moved), max_steps=4)
    resumed.train(resume_from_checkpoint=True)  # same weights elsewhere: the same parent
    assert resumed.state.global_step == 4
    changes = read_lineage(run / "checkpoint-4" / HKT_CONFIG_NAME)["resumed_changes"]
    assert changes == [{"step": 2, "setting": "hkt_parent", "old": str(parent_dir), "new": str(moved)}]


def test_a_setting_that_keeps_the_objective_is_accepted_warned_and_recorded(run_copy, caplog):
    trainer = vit_trainer(run_copy, max_steps=4, hkt_on_nonfinite="skip")
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert "hkt_on_nonfinite: 'stop' -> 'skip'" in caplog.text
    change = {"step": 2, "setting": "hkt_on_nonfinite", "old": "stop", "new": "skip"}
    assert read_lineage(run_copy / "checkpoint-4" / HKT_CONFIG_NAME)["resumed_changes"] == [change]
    trainer.save_model()
    assert "resumed at step 2 with hkt_on_nonfinite: 'stop' -> 'skip'" in format_lineage(
        read_lineage(run_copy / HKT_CONFIG_NAME))


@pytest.mark.parametrize("marker", ["manifest", "legacy"])
@pytest.mark.parametrize("how", ["missing", "not json", "invalid value", "not an object"])
def test_a_checkpoint_without_a_valid_hkt_config_is_refused(run_copy, how, marker):
    checkpoint = run_copy / "checkpoint-2"
    if marker == "legacy":
        use_legacy_marker(checkpoint)
    path = checkpoint / HKT_CONFIG_NAME
    record = json.loads(path.read_text())
    if how == "missing":
        path.unlink()
    else:
        text = {"not json": path.read_text()[:-3], "invalid value": json.dumps({**record, "hkt_lambda": 7.0}),
                "not an object": "[]"}[how]
        path.write_text(text)
    message = refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))
    assert str(path) in message or f"{checkpoint}: it has no {HKT_CONFIG_NAME}" in message, message


# ---- 3. the parent's identity by content -------------------------------------------------------------------------


def test_the_parent_fingerprint_follows_the_weights_not_the_object():
    parent = H.tiny_vit(16, seed=1)
    same = H.tiny_vit(16, seed=1)
    assert parent_fingerprint(parent) == parent_fingerprint(same)
    with torch.no_grad():
        same.classifier.bias[0] = torch.nextafter(same.classifier.bias[0], torch.tensor(1.0))
    assert parent_fingerprint(parent) != parent_fingerprint(same)
    assert parent_fingerprint(parent) != parent_fingerprint(H.tiny_vit(16, seed=1).to(torch.bfloat16))
    assert parent_fingerprint(torch.nn.Linear(2, 2, device="meta")) is None


def test_lineage_and_card_name_the_parent_by_content_and_hub_commit(tmp_path):
    parent = H.tiny_vit(16, seed=1)
    parent.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    trainer = vit_trainer(tmp_path / "run", parent=parent, save_strategy="no", max_steps=1)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="child")
    record = read_lineage(tmp_path / "run" / HKT_CONFIG_NAME)
    assert record["format_version"] == FORMAT_VERSION == 3
    assert record["parent_sha256"] == parent_fingerprint(H.tiny_vit(16, seed=1))
    assert record["parent_commit"] == parent.config._commit_hash
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| Parent weights (sha256) | `{record['parent_sha256']}` |" in card
    assert f"| Parent Hub commit | `{parent.config._commit_hash}` |" in card


def test_a_checkpoint_of_an_earlier_format_resumes_with_the_same_parent_name(run_copy, caplog):
    """Version 2 records have no fingerprint: the parent's name decides, and the new fingerprint is recorded."""
    checkpoint = run_copy / "checkpoint-2"
    use_legacy_marker(checkpoint)
    path = checkpoint / HKT_CONFIG_NAME
    record = json.loads(path.read_text())
    for key in ("parent_sha256", "parent_commit"):
        del record[key]
    path.write_text(json.dumps({**record, "format_version": 2}))
    trainer = vit_trainer(run_copy, max_steps=4)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    [change] = read_lineage(run_copy / "checkpoint-4" / HKT_CONFIG_NAME)["resumed_changes"]
    assert (change["setting"], change["old"]) == ("parent_sha256", None)

    path.write_text(json.dumps({**record, "format_version": 2, "hkt_parent": "org/other-parent"}))
    assert "hkt_parent: 'org/other-parent' -> None" in refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))


# ---- 4. a checkpoint folder reused by a second run ----------------------------------------------------------------


def test_a_half_written_checkpoint_of_a_second_run_is_never_resumed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    vit_trainer(run, max_steps=4).train()  # run 1: complete checkpoint-2 and checkpoint-4
    first_optimizer = (run / "checkpoint-4" / "optimizer.pt").read_bytes()

    second = vit_trainer(run, child=H.tiny_vit(8, seed=5), max_steps=4)
    save = second._save_optimizer_and_scheduler

    def die_at_step_4(output_dir):  # run 2 dies after writing its weights into checkpoint-4
        if second.state.global_step == 4:
            raise KeyboardInterrupt
        save(output_dir)

    monkeypatch.setattr(second, "_save_optimizer_and_scheduler", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        second.train()
    half = run / "checkpoint-4"
    assert (half / "optimizer.pt").read_bytes() == first_optimizer  # run 1's, beside run 2's weights
    assert not is_complete(half)
    message = refused(vit_trainer(run, max_steps=4), str(half))
    assert "is not a complete checkpoint" in message and f"Resume from {run / 'checkpoint-2'}" in message
    resumed = vit_trainer(run, child=H.tiny_vit(8, seed=5), max_steps=4)
    resumed.train(resume_from_checkpoint=True)  # run 2's own checkpoint-2
    assert resumed.state.global_step == 4


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json", ADAPTER_WEIGHTS_NAME])
def test_a_checkpoint_file_overwritten_after_its_save_is_refused(run_copy, tmp_path, name):
    """Files replaced behind the marker's back (by a run or a tool that does not know about it)."""
    other = tmp_path / "other"
    vit_trainer(other, child=H.tiny_vit(8, seed=5), hkt_gate="learned").train()
    checkpoint = run_copy / "checkpoint-2"
    shutil.copy(other / "checkpoint-2" / name, checkpoint / name)
    message = refused(vit_trainer(run_copy, max_steps=4), True)
    assert f"{checkpoint / name}: it has" in message, message


@pytest.mark.parametrize("content", ["{not json", "[]", '{"files": [], "world_size": 1}', "\udcff"])
def test_a_damaged_completion_marker_is_refused_naming_it(run_copy, content):
    marker = run_copy / "checkpoint-2" / COMPLETE_MARKER
    marker.write_bytes(content.encode("utf-8", "surrogateescape"))
    message = refused(vit_trainer(run_copy, max_steps=4), True)
    assert f"its completion marker {marker} is damaged" in message, message


# ---- 5. a save that some process did not finish --------------------------------------------------------------------


def test_the_marker_waits_for_every_process_rng_state(run_copy):
    checkpoint = run_copy / "checkpoint-2"
    (checkpoint / COMPLETE_MARKER).unlink()
    shutil.copy(checkpoint / "rng_state.pth", checkpoint / "rng_state_0.pth")
    assert not mark_complete(checkpoint, world_size=2)  # rng_state_1.pth: that process died before writing it
    assert not is_complete(checkpoint)
    shutil.copy(checkpoint / "rng_state.pth", checkpoint / "rng_state_1.pth")
    assert mark_complete(checkpoint, world_size=2)
    verify_checkpoint(checkpoint)
    (checkpoint / "rng_state_1.pth").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / 'rng_state_1.pth'}: it is missing")):
        verify_checkpoint(checkpoint)


def test_a_manifest_of_two_processes_without_the_second_rng_state_is_refused(run_copy):
    checkpoint = run_copy / "checkpoint-2"
    marker = checkpoint / COMPLETE_MARKER
    manifest = json.loads(marker.read_text())
    manifest["files"]["rng_state_0.pth"] = manifest["files"].pop("rng_state.pth")
    shutil.move(checkpoint / "rng_state.pth", checkpoint / "rng_state_0.pth")
    marker.write_text(json.dumps({**manifest, "world_size": 2}))
    message = refused(vit_trainer(run_copy, max_steps=4), str(checkpoint))
    assert f"({checkpoint / 'rng_state_1.pth'} was never written)" in message, message


# ---- 6. a plain Trainer checkpoint ---------------------------------------------------------------------------------


def test_a_plain_trainer_checkpoint_is_diagnosed_and_hkt_starts_from_its_weights(tmp_path):
    plain_dir = tmp_path / "plain"
    args = TrainingArguments(str(plain_dir), use_cpu=True, report_to="none", max_steps=2, save_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True)
    plain = Trainer(H.tiny_vit(8, seed=2), args, train_dataset=H.image_dataset(16))
    plain.train()
    checkpoint = plain_dir / "checkpoint-2"
    for resume, out in ((str(checkpoint), tmp_path / "hkt"), (True, plain_dir)):
        message = refused(vit_trainer(out, max_steps=4), resume)
        assert f"{checkpoint} is a checkpoint of the plain Trainer (no {HKT_CONFIG_NAME}" in message, message
        assert f"from_pretrained('{checkpoint}')" in message and "without resume_from_checkpoint" in message

    child = AutoModelForImageClassification.from_pretrained(checkpoint)  # what the message says to do
    for key, value in plain.model.state_dict().items():
        assert torch.equal(child.state_dict()[key], value), key
    trainer = vit_trainer(tmp_path / "hkt", child=child, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and is_complete(tmp_path / "hkt" / "checkpoint-2")


# ---- 7. no stale files in a final folder ---------------------------------------------------------------------------


class SaveAt(TrainerCallback):
    """Saves the model into output_dir while training (adapter attached), as a user's callback might."""

    def __init__(self):
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.trainer.save_model()


def test_the_final_save_leaves_no_adapter_state_or_marker_of_a_save_made_while_training(tmp_path):
    saver = SaveAt()
    trainer = vit_trainer(tmp_path / "run", callbacks=[saver], save_strategy="no")
    saver.trainer = trainer
    trainer.train()
    out = tmp_path / "run"
    assert (out / ADAPTER_WEIGHTS_NAME).is_file()  # the mid-run save: the adapter was attached
    (out / COMPLETE_MARKER).write_text("complete\n")  # as if output_dir had been a checkpoint
    trainer.save_model()
    names = {p.name for p in out.iterdir()}
    assert ADAPTER_WEIGHTS_NAME not in names and COMPLETE_MARKER not in names
    assert names == {"config.json", "model.safetensors", "training_args.bin", HKT_CONFIG_NAME}


def test_saving_into_a_checkpoint_folder_unmarks_it(run_copy):
    """The folder then holds the final child, not what its marker listed: it is no longer a checkpoint."""
    trainer = vit_trainer(run_copy)
    trainer.save_model(str(run_copy / "checkpoint-2"))
    assert not is_complete(run_copy / "checkpoint-2")


# ---- 8. load_best_model_at_end for every architecture -----------------------------------------------------------


class Ranks:
    """`compute_metrics` whose `rank` is lowest at the second evaluation: checkpoint-2 is the best."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prediction) -> dict[str, float]:
        self.calls += 1
        return {"rank": [3.0, 1.0, 2.0, 4.0][self.calls - 1]}


def best_args(output_dir: Path, **args):
    return H.training_args(output_dir, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                           save_steps=1, load_best_model_at_end=True, metric_for_best_model="rank",
                           greater_is_better=False, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                           **args)


def assert_best_restored(trainer, auto_class, out: Path) -> None:
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    best = auto_class.from_pretrained(out / "checkpoint-2").state_dict()
    last = auto_class.from_pretrained(out / "checkpoint-4").state_dict()
    model = trainer.model.state_dict()
    assert set(model) == set(best)
    assert any(not torch.equal(best[k], last[k]) for k in best)  # the test can tell the two apart
    for key, value in best.items():
        assert torch.equal(model[key], value), f"{key} is not the best checkpoint's"


def lm_rows():
    tokenizer = H.word_tokenizer()
    rows = [{k: e[k] for k in ("input_ids", "attention_mask")} for e in map(tokenizer, H.sentiment_dataset(16)["text"])]
    return rows, DataCollatorForLanguageModeling(tokenizer, mlm=False)


def tiny_llama(hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(H.word_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0))


def test_load_best_model_at_end_restores_a_vit_child(tmp_path):
    out = tmp_path / "vit"
    trainer = HKTTrainer(H.tiny_vit(8, seed=2), best_args(out), parent_model=H.tiny_vit(16, seed=1),
                         train_dataset=H.image_dataset(16), eval_dataset=H.image_dataset(4), compute_metrics=Ranks())
    trainer.train()
    assert_best_restored(trainer, AutoModelForImageClassification, out)


def test_load_best_model_at_end_restores_a_bert_child(tmp_path):
    tokenizer = H.word_tokenizer()

    def encode(row):
        return tokenizer(row["text"], padding="max_length", truncation=True, max_length=12)

    data = H.sentiment_dataset(16).map(encode, remove_columns=["text"]).rename_column("label", "labels")
    out = tmp_path / "bert"
    vocab = len(tokenizer)
    trainer = HKTTrainer(H.tiny_bert(8, vocab, seed=2), best_args(out), parent_model=H.tiny_bert(16, vocab, seed=1),
                         train_dataset=data, eval_dataset=data.select(range(4)), compute_metrics=Ranks())
    trainer.train()
    assert_best_restored(trainer, AutoModelForSequenceClassification, out)


def test_load_best_model_at_end_restores_a_llama_child(tmp_path):
    rows, collator = lm_rows()
    out = tmp_path / "llama"
    trainer = HKTTrainer(tiny_llama(8, seed=2), best_args(out, remove_unused_columns=False),
                         parent_model=tiny_llama(16, seed=1), train_dataset=rows, eval_dataset=rows[:4],
                         data_collator=collator, compute_metrics=Ranks())
    trainer.train()
    assert_best_restored(trainer, AutoModelForCausalLM, out)


def test_saved_weights_in_another_layout_are_converted_back(tmp_path):
    """Mixtral saves one tensor per expert for its fused experts: not a renaming, read back with from_pretrained."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    model.save_pretrained(tmp_path)
    assert not set(load_file(tmp_path / "model.safetensors")) <= set(model.state_dict())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(load_runtime_state_dict(model, tmp_path))
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---- 5b. two real processes (torchrun) ----------------------------------------------------------------------------


class SlowThenDyingSecondProcess(HKTTrainer):
    """Process 1 writes its RNG state of checkpoint-2 late, and dies before writing that of checkpoint-4."""

    def _save_rng_state(self, output_dir: str) -> None:
        if self.args.process_index == 1:
            if self.state.global_step == 4:
                os._exit(3)
            time.sleep(2)
        super()._save_rng_state(output_dir)


def two_process_worker(out: Path) -> None:
    """Run by `torchrun --nproc_per_node 2 tests/test_resume_faults.py OUT`."""
    torch.set_num_threads(1)
    args = H.training_args(out, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                           hkt_carriers=[CARRIER])
    trainer = SlowThenDyingSecondProcess(H.tiny_vit(8, seed=2), args, train_dataset=H.image_dataset(16),
                                         parent_model=H.tiny_vit(16, seed=1))
    trainer.train()


def test_the_marker_of_a_two_process_save_waits_for_both_and_a_dead_process_leaves_none(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # process 1 died at step 4
    complete = out / "checkpoint-2"
    assert is_complete(complete), proc.stderr[-3000:]
    files = json.loads((complete / COMPLETE_MARKER).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)  # written after the late process 1
    verify_checkpoint(complete)
    assert (out / "checkpoint-4" / "model.safetensors").is_file() and not is_complete(out / "checkpoint-4")
    assert not (out / "checkpoint-4" / "rng_state_1.pth").exists()


if __name__ == "__main__":
    two_process_worker(Path(sys.argv[1]))
