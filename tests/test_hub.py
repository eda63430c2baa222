"""Sharing children on the Hub without internet: pushes to a fake Hub on 127.0.0.1 (tests/hub_server.py), with the
Trainer's own `push_to_hub` (mid-training and final) and with `push_child` for a saved folder, deliver the plain child,
its processor, `hkt_config.json` and a card with the lineage; a pull by repo id from a populated Hugging Face cache with
HF_HUB_OFFLINE=1 reproduces the child's logits and its lineage.

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

from hkt_hf.hub import check_child_folder, load_lineage
from hkt_hf.lineage import format_lineage, parse_lineage, write_lineage
from hkt_hf.model_card import render_model_card
from hub_server import FakeHub

TESTS = Path(__file__).resolve().parent
CHILD_REPO = "org/hkt-child"
FOLDER_REPO = "org/saved-child"
PARENT = "org/parent-resnet14"
PARENT_REVISION = "0123abcd"
DATASET = "local/bright-squares"
# What the Trainer's own push uploads: everything in output_dir but checkpoints (so also its training_args.bin).
TRAINER_FILES = {"model.safetensors", "config.json", "preprocessor_config.json", "hkt_config.json", "README.md",
                 "training_args.bin"}
FOLDER_FILES = TRAINER_FILES - {"training_args.bin"}

# Trains a tiny CIFAR ResNet child for 2 steps with a wider parent (so a trainable aligner exists), pushing the
# checkpoint of step 2 mid-training (args.push_to_hub, the Trainer's every-save strategy), evaluates it, saves a copy
# (which pushes too, as the Trainer does), pushes it with `trainer.push_to_hub` and the official scripts' card
# keywords, and pushes the saved copy with `push_child`.
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
    save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id=sys.argv[5], hub_token="hf_test",
)
trainer = HKTTrainer(
    cifar(8, 4, 0), args, parent_model=cifar(14, 8, 1), train_dataset=image_dataset(16),
    eval_dataset=image_dataset(8, seed=1), processing_class=cifar_image_processor(16), compute_metrics=accuracy,
)
trainer.train()
mid_training = {p.name for p in (work / "run").iterdir() if p.is_file()}
(work / "mid_training_files.json").write_text(json.dumps(sorted(mid_training)))
trainer.evaluate()
trainer.save_model(work / "saved")  # with args.push_to_hub, the Trainer pushes output_dir on a user's save too
trainer.push_to_hub(dataset_tags=sys.argv[7], dataset=sys.argv[7], tags="mytag", language="en", license="apache-2.0")
push_child(work / "saved", sys.argv[6], token="hf_test", parent_metrics={"eval_accuracy": 0.75})

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
        script_args = [str(TESTS), str(work), PARENT, PARENT_REVISION, CHILD_REPO, FOLDER_REPO, DATASET]
        run_script(PUSH_SCRIPT, script_args, env)
    return hub, work


# ---- push ---------------------------------------------------------------------------------------------------------


def test_push_delivers_exactly_the_plain_child(pushed):
    hub, work = pushed
    assert hub.unexpected == []
    assert set(hub.repos) == {CHILD_REPO, FOLDER_REPO}
    assert set(hub.repos[CHILD_REPO]) == TRAINER_FILES
    assert set(hub.repos[FOLDER_REPO]) == FOLDER_FILES
    # As with the plain Trainer: the mid-training push (checkpoint of step 2), a push on the user's `save_model`
    # (args.push_to_hub is on) and the final push; one commit for the folder pushed with push_child.
    messages = [c.get("summary", "") for c in hub.commits if c["repo_id"] == CHILD_REPO]
    assert messages == ["Training in progress, step 2", "Model save", "End of training"]
    assert [c["repo_id"] for c in hub.commits if c["repo_id"] != CHILD_REPO] == [FOLDER_REPO]
    # Checkpoints hold the plain child's weights; the adapter's state is a file of its own that never leaves.
    run = work / "run"
    checkpoint_weights = load_safetensors((run / "checkpoint-2" / "model.safetensors").read_bytes())
    assert not any(key.startswith("hkt_adapter.") for key in checkpoint_weights)
    assert (run / "checkpoint-2" / "hkt_adapter.safetensors").is_file()
    weights = load_safetensors(hub.repos[CHILD_REPO]["model.safetensors"])
    assert set(weights) == set(checkpoint_weights)
    assert hub.repos[CHILD_REPO]["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert hub.repos[FOLDER_REPO]["model.safetensors"] == hub.repos[CHILD_REPO]["model.safetensors"]
    assert "hkt_adapter.safetensors" not in json.loads((work / "mid_training_files.json").read_text())
    assert all(auth == "Bearer hf_test" for _, _, auth in hub.requests)


def test_pushed_lineage_and_processor(pushed):
    hub, _ = pushed
    lineage = parse_lineage(json.loads(hub.repos[CHILD_REPO]["hkt_config.json"]))
    assert (lineage["hkt_parent"], lineage["hkt_parent_revision"]) == (PARENT, PARENT_REVISION)
    assert lineage["child_architecture"] == "CifarResNetForImageClassification"
    assert json.loads(hub.repos[CHILD_REPO]["preprocessor_config.json"])["size"] == {"height": 16, "width": 16}


def test_pushed_card_is_the_trainers_card_plus_the_lineage(pushed):
    """The official scripts' keywords keep transformers' meaning (a string tag is one tag), and HKT adds its tags,
    the task transformers cannot infer for a custom architecture, and the lineage section."""
    hub, work = pushed
    card = ModelCard(hub.repos[CHILD_REPO]["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers"
    assert {"mytag", "generated_from_trainer", "hkt", "knowledge-distillation"} <= set(meta["tags"])
    assert not {"m", "y", "t"} & set(meta["tags"])
    assert meta["datasets"] == [DATASET] and meta["language"] == ["en"] and meta["license"] == "apache-2.0"
    history = json.loads((work / "log_history.json").read_text())
    accuracy = [h["eval_accuracy"] for h in history if "eval_accuracy" in h][-1]
    [index] = meta["model-index"]
    [result] = index["results"]
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == DATASET
    assert {m["type"]: m["value"] for m in result["metrics"]}["accuracy"] == pytest.approx(accuracy)
    body = card.text
    for expected in (PARENT_REVISION, f"[`{PARENT}`](https://huggingface.co/{PARENT})", "genetic", "| lambda | 0.6 |",
                     "1.0, 1.0, 1.0", "arXiv:2508.09743", "Tchenko", "training_steps: 2"):
        assert expected in body, expected
    # Pushed from a bare saved folder, the card has the lineage, the caller's parent metrics and no invented results.
    folder_card = ModelCard(hub.repos[FOLDER_REPO]["README.md"].decode())
    assert "model-index" not in folder_card.data.to_dict()
    assert "| accuracy | - | 0.7500 |" in folder_card.text
    assert f'AutoModelForImageClassification.from_pretrained("{FOLDER_REPO}")' in folder_card.text


# ---- pull ---------------------------------------------------------------------------------------------------------


def test_pull_by_repo_id_from_offline_cache_reproduces_logits(pushed, tmp_path):
    """conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, so this pull can only read the cache."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    hub, work = pushed
    cache = tmp_path / "hub-cache"
    commit = [c["oid"] for c in hub.commits if c["repo_id"] == CHILD_REPO][-1]
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
    assert lineage == parse_lineage(json.loads(hub.repos[CHILD_REPO]["hkt_config.json"]))
    assert f"{PARENT} @ {PARENT_REVISION}" in format_lineage(lineage)
    # Offline, a cached repository without a lineage record gets an error that names the missing file.
    populate_cache(cache, "org/plain", {"config.json": hub.repos[CHILD_REPO]["config.json"]}, commit)
    with pytest.raises(FileNotFoundError, match="hkt_config.json is not in the local cache"):
        load_lineage("org/plain", cache_dir=cache)


# ---- in-process pieces ----------------------------------------------------------------------------------------------


def record(**settings) -> dict:
    base = {"format_version": 2, "child_architecture": "BertForSequenceClassification", "hkt_parent": PARENT,
            "hkt_carriers": ["auto"], "hkt_gate": "genetic", "hkt_lambda": 0.6, "hkt_loss_weights": [1.0, 1.0, 1.0],
            "hkt_parent_mode": "eval", "hkt_kd_weight": 0.0, "hkt_kd_temperature": 4.0, "hkt_kd_loss": "kl"}
    return parse_lineage({**base, **settings})


def test_card_of_a_local_parent_has_no_base_model(tmp_path):
    lineage = record(hkt_parent=str(tmp_path), hkt_carriers=["a=b"])
    card = render_model_card(lineage, "user/child", task="text-classification", child_metrics={"accuracy": 0.8})
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "model-index" not in meta  # results need a dataset to be indexed
    assert "model-index" not in render_model_card(lineage, "user/child", dataset="user/data").data.to_dict()
    assert meta["pipeline_tag"] == "text-classification"
    assert "| accuracy | 0.8000 | - |" in card.text
    hub_card = render_model_card(record(), "user/child").data.to_dict()
    assert (hub_card["base_model"], hub_card["base_model_relation"]) == (PARENT, "finetune")


def test_push_child_refuses_checkpoints_and_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_child_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    write_lineage(record(), tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_child_folder(tmp_path)
    save_file({"classifier.weight": torch.zeros(2, 2), "hkt_adapter.gates.0.lam": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="aligner/gate weights"):
        check_child_folder(tmp_path)
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    assert check_child_folder(tmp_path) == tmp_path


def test_load_lineage_from_a_folder_and_its_text(tmp_path):
    lineage = record(hkt_parent_revision=PARENT_REVISION, hkt_carriers=["p.pool=c.pool"], hkt_lambda=0.4,
                     hkt_kd_weight=0.5)
    write_lineage(lineage, tmp_path)
    assert load_lineage(tmp_path) == lineage
    text = format_lineage(lineage)
    for expected in (f"{PARENT} @ {PARENT_REVISION}", "p.pool=c.pool", "lambda 0.4", "weight 0.5, temperature 4"):
        assert expected in text, expected
    with pytest.raises(FileNotFoundError, match="not a child saved by hkt-hf"):
        load_lineage(tmp_path / "..")


def test_version_1_records_of_earlier_releases_still_read(tmp_path):
    """hkt-hf 0.1 wrote the settings without the `hkt_` prefix and lambda as `lam`; pulled children keep working."""
    v1 = {"format_version": 1, "parent": PARENT, "parent_revision": None, "carriers": ["auto"], "gate": "agreement",
          "lam": 0.3, "loss_weights": [1, 0, 1], "parent_mode": "eval", "kd_weight": 0.0, "kd_temperature": 4.0,
          "kd_loss": "kl", "on_nonfinite": "stop", "child_architecture": "ViTForImageClassification"}
    lineage = parse_lineage(v1)
    assert (lineage["hkt_parent"], lineage["hkt_gate"], lineage["hkt_lambda"]) == (PARENT, "agreement", 0.3)
    # A setting added later reads as the default the record was trained with, so its resumes are not refused.
    assert lineage["hkt_hint_weight"] == 0.0 and record()["hkt_hint_weight"] == 0.0
    assert record(hkt_hint_weight=0.5)["hkt_hint_weight"] == 0.5
    with pytest.raises(ValueError, match="hkt_lambda must lie in"):
        parse_lineage({**v1, "lam": 3.0})
