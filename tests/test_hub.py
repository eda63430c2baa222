"""Sharing children on the Hub without internet: a push to a fake Hub on 127.0.0.1 (tests/hub_server.py) delivers
exactly the plain child, its processor, `hkt_config.json` and the card; a pull by repo id from a populated Hugging
Face cache with HF_HUB_OFFLINE=1 reproduces the child's logits and its lineage.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported: the push runs in a subprocess pointed at the fake
Hub; the pull runs here, where conftest has switched offline mode on before any import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hkt_hf.config import HKTConfig
from hkt_hf.hub import check_child_folder, format_lineage, latest_eval_metrics, load_lineage, render_model_card
from hub_server import FakeHub

TESTS = Path(__file__).resolve().parent
CHILD_REPO = "org/hkt-child"
FOLDER_REPO = "org/saved-child"
SAVE_REPO = "org/pushed-on-save"
PARENT = "org/parent-resnet14"
PARENT_REVISION = "0123abcd"
DATASET = "local/bright-squares"
EXPECTED_FILES = {"model.safetensors", "config.json", "preprocessor_config.json", "hkt_config.json", "README.md"}

# Trains a tiny CIFAR ResNet child for 2 steps with a wider parent (so a trainable aligner exists, and the checkpoint
# written to the output folder holds it),
# evaluates it, pushes it with `trainer.push_to_hub`, a saved copy with `push_child`, and once more via `save_model`.
PUSH_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from helpers import image_dataset, training_args
from hkt_hf import CifarResNetConfig, CifarResNetForImageClassification, HKTTrainer, cifar_image_processor
from hkt_hf.hub import push_child

work = Path(sys.argv[2])

def cifar(depth, width, seed):
    torch.manual_seed(seed)
    config = CifarResNetConfig(depth=depth, hidden_sizes=[width, 2 * width, 4 * width], num_labels=3)
    return CifarResNetForImageClassification(config)

def accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

args = training_args(
    work / "run", hkt_parent=sys.argv[3], hkt_parent_revision=sys.argv[4], max_steps=2,
    save_strategy="steps", save_steps=2,
)
trainer = HKTTrainer(
    cifar(8, 4, 0), args, parent_model=cifar(14, 8, 1), train_dataset=image_dataset(16),
    eval_dataset=image_dataset(8, seed=1), processing_class=cifar_image_processor(16), compute_metrics=accuracy,
)
trainer.train()
trainer.evaluate()
trainer.args.hub_model_id = sys.argv[5]
trainer.push_to_hub(token="hf_test", dataset=sys.argv[7], parent_metrics={"eval_accuracy": 0.75})
trainer.save_model(work / "saved")
push_child(work / "saved", sys.argv[6], token="hf_test")
# With args.push_to_hub, a user's save_model pushes too (Trainer's behaviour), once.
trainer.args.push_to_hub, trainer.args.hub_model_id, trainer.args.hub_token = True, sys.argv[8], "hf_test"
trainer.save_model()

pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = trainer.model.eval()(pixel_values=pixels).logits
torch.save({"pixels": pixels, "logits": logits}, work / "expected.pt")
(work / "log_history.json").write_text(json.dumps(trainer.state.log_history))
"""



def hub_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Hub subprocess: its own HF_HOME, no proxy, nothing inherited that points elsewhere."""
    # huggingface_hub also reads TRANSFORMERS_OFFLINE as offline mode (CI sets it).
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_script(script: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    """Lay `files` out as huggingface_hub's cache does: blobs by hash, a snapshot of symlinks, refs/main."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Runs PUSH_SCRIPT against a fake Hub; returns the Hub (stopped) and the work folder."""
    work = tmp_path_factory.mktemp("hub-push")
    with FakeHub() as hub:
        env = hub_env(work / "hf-home", HF_ENDPOINT=hub.endpoint)
        script_args = [str(TESTS), str(work), PARENT, PARENT_REVISION, CHILD_REPO, FOLDER_REPO, DATASET, SAVE_REPO]
        run_script(PUSH_SCRIPT, script_args, env)
    return hub, work


# ---- push ---------------------------------------------------------------------------------------------------------


def test_push_delivers_exactly_the_plain_child(pushed):
    hub, work = pushed
    assert hub.unexpected == []
    assert set(hub.repos) == {CHILD_REPO, FOLDER_REPO, SAVE_REPO}
    for repo in hub.repos:
        assert set(hub.repos[repo]) == EXPECTED_FILES
    assert sorted(c["repo_id"] for c in hub.commits) == sorted(hub.repos)  # one commit each
    # The output folder also held a checkpoint with the aligners and the training state: none of it left.
    run = work / "run"
    checkpoint_weights = load_safetensors((run / "checkpoint-2" / "model.safetensors").read_bytes())
    assert any(key.startswith("hkt_adapter.") for key in checkpoint_weights)
    assert (run / "training_args.bin").exists()
    weights = load_safetensors(hub.repos[CHILD_REPO]["model.safetensors"])
    assert not any(key.startswith("hkt_adapter.") for key in weights)
    assert set(weights) == {k for k in checkpoint_weights if not k.startswith("hkt_adapter.")}
    assert hub.repos[CHILD_REPO]["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert hub.repos[FOLDER_REPO]["model.safetensors"] == hub.repos[CHILD_REPO]["model.safetensors"]
    assert all(auth == "Bearer hf_test" for _, _, auth in hub.requests)


def test_pushed_lineage_and_processor(pushed):
    hub, _ = pushed
    lineage = HKTConfig.from_dict(json.loads(hub.repos[CHILD_REPO]["hkt_config.json"]))
    assert (lineage.parent, lineage.parent_revision) == (PARENT, PARENT_REVISION)
    assert lineage.child_architecture == "CifarResNetForImageClassification"
    assert json.loads(hub.repos[CHILD_REPO]["preprocessor_config.json"])["size"] == {"height": 16, "width": 16}


def test_pushed_card_metadata_and_body(pushed):
    hub, work = pushed
    card = ModelCard(hub.repos[CHILD_REPO]["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert {"hkt", "knowledge-distillation"} <= set(meta["tags"])
    assert (meta["base_model"], meta["base_model_relation"]) == (PARENT, "finetune")
    assert meta["datasets"] == [DATASET]
    assert meta["pipeline_tag"] == "image-classification"
    # The model-index holds the run's own last evaluation, read from the trainer's log history.
    logged = latest_eval_metrics(json.loads((work / "log_history.json").read_text()))
    assert set(logged) == {"loss", "accuracy"}
    [index] = meta["model-index"]
    assert index["name"] == CHILD_REPO
    [result] = index["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == DATASET
    assert {m["type"]: m["value"] for m in result["metrics"]} == pytest.approx(logged)
    body = card.text
    for expected in (PARENT_REVISION, "genetic", "| lambda | 0.6 |", "1.0, 1.0, 1.0", "arXiv:2508.09743",
                     "Tchenko", f"| accuracy | {logged['accuracy']:.4f} | 0.7500 |", "- training steps: 2",
                     f'AutoModelForImageClassification.from_pretrained("{CHILD_REPO}")'):
        assert expected in body, expected
    # Pushed from a bare saved folder, the card has the lineage but no invented results.
    folder_card = ModelCard(hub.repos[FOLDER_REPO]["README.md"].decode())
    assert "model-index" not in folder_card.data.to_dict()
    assert "No evaluation results were recorded" in folder_card.text


# ---- pull ---------------------------------------------------------------------------------------------------------


def test_pull_by_repo_id_from_offline_cache_reproduces_logits(pushed, tmp_path):
    """conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, so this pull can only read the cache."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    hub, work = pushed
    cache = tmp_path / "hub-cache"
    [commit] = [c["oid"] for c in hub.commits if c["repo_id"] == CHILD_REPO]
    populate_cache(cache, CHILD_REPO, hub.repos[CHILD_REPO], commit)

    model = AutoModelForImageClassification.from_pretrained(CHILD_REPO, cache_dir=cache).eval()
    processor = AutoImageProcessor.from_pretrained(CHILD_REPO, cache_dir=cache)
    expected = torch.load(work / "expected.pt")
    with torch.no_grad():
        logits = model(pixel_values=expected["pixels"]).logits
    assert type(model).__name__ == "CifarResNetForImageClassification"
    assert torch.equal(logits, expected["logits"])
    assert processor.to_dict()["size"] == {"height": 16, "width": 16}

    lineage = load_lineage(CHILD_REPO, cache_dir=cache)
    assert lineage == HKTConfig.from_dict(json.loads(hub.repos[CHILD_REPO]["hkt_config.json"]))
    assert f"{PARENT} @ {PARENT_REVISION}" in format_lineage(lineage)
    # Offline, a cached repository without a lineage record gets an error that names the missing file.
    populate_cache(cache, "org/plain", {"config.json": hub.repos[CHILD_REPO]["config.json"]}, commit)
    with pytest.raises(FileNotFoundError, match="hkt_config.json is not in the local cache"):
        load_lineage("org/plain", cache_dir=cache)


# ---- in-process pieces ----------------------------------------------------------------------------------------------


def test_latest_eval_metrics_takes_the_last_evaluation_without_speed_figures():
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_loss": 0.9, "eval_accuracy": 0.5, "step": 1},
        {"eval_loss": 0.7, "eval_accuracy": 0.6, "eval_runtime": 1.2, "eval_samples_per_second": 9.0, "step": 2},
        {"train_runtime": 3.0, "step": 2},
    ]
    assert latest_eval_metrics(history) == {"loss": 0.7, "accuracy": 0.6}
    assert latest_eval_metrics([{"loss": 1.0}]) == {}


def test_card_of_a_local_parent_has_no_base_model(tmp_path):
    cfg = HKTConfig(parent=str(tmp_path), carriers=["a=b"], child_architecture="BertForSequenceClassification")
    card = render_model_card(cfg, "user/child", child_metrics={"accuracy": 0.8})
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "model-index" not in meta  # results need a dataset to be indexed
    assert "model-index" not in render_model_card(cfg, "user/child", dataset="user/data").data.to_dict()
    assert meta["pipeline_tag"] == "text-classification"
    assert "| accuracy | 0.8000 | - |" in card.text
    assert "AutoModelForSequenceClassification" in card.text


def test_push_child_refuses_checkpoints_and_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_child_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    HKTConfig(parent=PARENT).to_json_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_child_folder(tmp_path)
    save_file({"classifier.weight": torch.zeros(2, 2), "hkt_adapter.gates.0.lam": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="aligner/gate weights"):
        check_child_folder(tmp_path)
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert check_child_folder(tmp_path) == tmp_path


def test_load_lineage_from_a_folder_and_its_text(tmp_path):
    cfg = HKTConfig(parent=PARENT, parent_revision=PARENT_REVISION, carriers=["p.pool=c.pool"], lam=0.4, kd_weight=0.5,
                    child_architecture="CifarResNetForImageClassification")
    cfg.to_json_file(tmp_path)
    assert load_lineage(tmp_path) == cfg
    text = format_lineage(cfg)
    for expected in (f"{PARENT} @ {PARENT_REVISION}", "p.pool=c.pool", "lambda 0.4", "weight 0.5, temperature 4"):
        assert expected in text, expected
    with pytest.raises(FileNotFoundError, match="not a child saved by hkt-hf"):
        load_lineage(tmp_path / "..")
