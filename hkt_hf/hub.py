"""Share HKT children on the Hugging Face Hub without a trainer: push a saved child folder, read a child's lineage.

`HKTTrainer.push_to_hub` is the Trainer's own. `push_child` uploads an already-saved child (weights, config,
processor, `hkt_config.json`) with a card from `model_card.render_model_card`; aligners and gates never leave the
machine. `load_lineage` reads a child's `hkt_config.json` from a local folder or a Hub repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import create_repo, hf_hub_download, upload_folder
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
from safetensors import safe_open
from transformers import AutoConfig

from .adapter import ADAPTER_NAME
from .lineage import HKT_CONFIG_NAME, read_lineage
from .model_card import render_model_card
from .tasks import task_of_saved

# What a child repository holds: the plain model, its processor / tokenizer, the lineage record and the card.
# An allow-list, so that checkpoints, optimizer states and training arguments in the same folder stay local.
CHILD_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
    HKT_CONFIG_NAME,
    "README.md",
]


def check_child_folder(folder: str | os.PathLike) -> Path:
    """Refuse a folder that is not a plain saved child: no config, no weights, no lineage, or aligner/gate weights."""
    folder = Path(folder)
    for name in ("config.json", HKT_CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} has no {name}. Save the child with `HKTTrainer.save_model(folder)` (which writes the plain "
                "child and hkt_config.json) before pushing it."
            )
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no model*.safetensors weights; save the child with safetensors.")
    for path in weights:
        with safe_open(str(path), framework="pt") as f:
            if any(key.startswith(f"{ADAPTER_NAME}.") for key in f.keys()):
                raise ValueError(
                    f"{path} holds HKT aligner/gate weights ({ADAPTER_NAME}.*): it is not a plain child. Push the "
                    "folder written by `trainer.save_model(folder)` after training."
                )
    return folder


def push_child(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload HKT child",
    run_as_future: bool = False,
    **card_info: Any,
):
    """Push an already-saved child to the Hub: its weights, config, processor files, `hkt_config.json` and a model
    card written to `folder/README.md` (`model_card.render_model_card(**card_info)`). Nothing else in the folder goes.

    Returns the `CommitInfo` of `upload_folder` (a `Future` of it with `run_as_future=True`).
    """
    folder = check_child_folder(folder)
    record = read_lineage(folder / HKT_CONFIG_NAME)
    repo_id = create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    model_name = card_info.pop("model_name", None) or repo_id
    task, auto_class = task_of_saved(AutoConfig.from_pretrained(folder), record.get("child_architecture") or "")
    card_info.setdefault("task", task)
    render_model_card(record, model_name, auto_class=auto_class, **card_info).save(folder / "README.md")
    return upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=CHILD_FILES,
        commit_message=commit_message,
        token=token,
        revision=revision,
        run_as_future=run_as_future,
    )


def load_lineage(repo_id_or_dir: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any) -> dict[str, Any]:
    """The lineage record of a child, from a local folder or a Hub repository (`hf_hub_download`, so the cache and
    `HF_HUB_OFFLINE` apply). `hub_kwargs` go to `hf_hub_download` (e.g. `token`, `cache_dir`)."""
    local = Path(repo_id_or_dir)
    if local.is_dir():
        path = local / HKT_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{local} has no {HKT_CONFIG_NAME}: it is not a child saved by hkt-hf.")
    else:
        try:
            path = hf_hub_download(str(repo_id_or_dir), HKT_CONFIG_NAME, revision=revision, **hub_kwargs)
        except RemoteEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id_or_dir} has no {HKT_CONFIG_NAME}: it was not pushed by hkt-hf, so its lineage is unknown."
            ) from err
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"{repo_id_or_dir}: {HKT_CONFIG_NAME} is not in the local cache and the Hub cannot be reached (offline "
                "mode or no connection). Download the child while online first, or pass its local folder."
            ) from err
    return read_lineage(path)
