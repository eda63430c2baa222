"""The lineage record `hkt_config.json`: where a child comes from and how it was trained.

It holds the run's `hkt_*` settings under their `HKTTrainingArguments` field names (the parent and carriers as
resolved by the trainer), the child's architecture, the parent's identity by content (`parent_sha256`, a fingerprint
of its weights, and `parent_commit`, the Hub commit it was pulled at), settings changed when a run was resumed, and a
format version. Nothing here lists the `hkt_*` fields again: the record is derived from the arguments, and read back
through the same validation. A resume compares the checkpoint's record with the run's (`resume_lineage`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .compat import hub_commit
from .model_state import base_of, whole_state
from .training_args import HKTTrainingArguments, validate_hkt_settings

logger = logging.get_logger(__name__)

HKT_CONFIG_NAME = "hkt_config.json"
FORMAT_VERSION = 3
# Version 3 added the parent's identity and the settings changed on resume; older records lack them (unknown).
IDENTITY_KEYS = ("parent_sha256", "parent_commit")
RECORD_KEYS = ("format_version", "child_architecture", *IDENTITY_KEYS, "resumed_changes")
# Version 1 (hkt-hf 0.1) wrote the settings without the prefix, and lambda as `lam`.
_V1_RENAMED = {"lam": "hkt_lambda"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Settings added since version 3 with a default that keeps the earlier objective: a record without one was written
# before it existed, so it trained with that default (and resumes as such).
_ADDED_DEFAULTS = {"hkt_hint_weight": 0.0}

# What defines the objective a checkpoint's optimizer state, schedule and aligners belong to: a resume keeps them.
OBJECTIVE_KEYS = (
    "child_architecture", "hkt_carriers", "hkt_gate", "hkt_lambda", "hkt_loss_weights", "hkt_parent_mode",
    "hkt_kd_weight", "hkt_kd_temperature", "hkt_kd_loss", "hkt_hint_weight",
)
# What names the parent where no fingerprint on both sides identifies it by content.
PARENT_NAME_KEYS = ("hkt_parent", "hkt_parent_revision", "parent_commit")
_NOT_COMPARED = ("format_version", "resumed_changes")
# How to go on from a checkpoint that cannot be resumed.
FROM_WEIGHTS = (
    "load the child with from_pretrained('{checkpoint}') and call train() without resume_from_checkpoint (its "
    "aligners, gates and optimizer start afresh)."
)
FRESH_START = "start a new run from its weights without resuming: " + FROM_WEIGHTS


def parent_fingerprint(parent: nn.Module) -> str | None:
    """sha256 over the parent's state dict (keys, dtypes, shapes and bytes, in sorted key order): the same weights
    give the same value wherever they are stored. None when a tensor has no data here (a meta or offloaded one).

    Called before the parent is sharded; a ZeRO-3 parameter partitioned at load time is gathered one at a time.
    """
    digest = hashlib.sha256()
    for key, tensor in whole_state(parent):
        if tensor.is_meta:
            return None
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def parent_identity(parent: nn.Module) -> dict[str, str | None]:
    """The parent's identity by content: its fingerprint and, when pulled from the Hub, the commit it was pulled at."""
    config = getattr(base_of(parent), "config", None)
    return {"parent_sha256": parent_fingerprint(parent), "parent_commit": hub_commit(config)}


def lineage_record(
    args: HKTTrainingArguments, *, parent: str | None, carriers: list[str], child_architecture: str,
    parent_sha256: str | None = None, parent_commit: str | None = None,
) -> dict[str, Any]:
    """The record of a run: `args`' HKT settings with the parent's name and identity and the resolved carriers."""
    record = args.hkt_settings()
    record.update(hkt_parent=parent, hkt_carriers=list(carriers))
    return {
        "format_version": FORMAT_VERSION, "child_architecture": child_architecture, "parent_sha256": parent_sha256,
        "parent_commit": parent_commit, **record,
    }


def write_lineage(record: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write `record` to `directory/hkt_config.json` atomically."""
    path = Path(directory) / HKT_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(_to_json(record) + "\n")
    os.replace(tmp, path)
    return path


def _to_json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True, default=str, allow_nan=False)


def _check_record_keys(data: Mapping[str, Any]) -> None:
    sha, commit, changes = data.get("parent_sha256"), data.get("parent_commit"), data.get("resumed_changes", [])
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise ValueError(f"parent_sha256 must be 64 lowercase hex digits or null, got {sha!r}.")
    if commit is not None and not isinstance(commit, str):
        raise ValueError(f"parent_commit must be a string or null, got {commit!r}.")
    if not isinstance(changes, list) or not all(isinstance(c, dict) and "setting" in c for c in changes):
        raise ValueError(f"resumed_changes must be a list of {{step, setting, old, new}} entries, got {changes!r}.")


def parse_lineage(data: dict[str, Any]) -> dict[str, Any]:
    """Check a record read from JSON (upgrading versions 1 and 2), refusing unknown versions, fields and values."""
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{HKT_CONFIG_NAME} has format_version {version!r}; this hkt-hf reads versions 1..{FORMAT_VERSION}. "
            "Upgrade hkt-hf (pip install -U hkt-hf) to read files written by newer releases."
        )
    if version == 1:
        data = {k if k in RECORD_KEYS else _V1_RENAMED.get(k, "hkt_" + k): v for k, v in data.items()}
    data = {**_ADDED_DEFAULTS, **data}
    settings = {k: v for k, v in data.items() if k not in RECORD_KEYS}
    try:
        validate_hkt_settings(settings)
        _check_record_keys(data)
    except ValueError as err:
        raise ValueError(f"{HKT_CONFIG_NAME} is not a valid lineage record: {err}") from None
    return {**data, "format_version": FORMAT_VERSION}


def read_lineage(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a lineage record (a JSON object), got {type(data).__name__}.")
    return parse_lineage(data)


def resume_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The settings that differ between a checkpoint's record `old` and this run's `new`: (refused, accepted).

    Refused: what changes the objective (gate, carriers, weights, lambda, KD, parent mode, child architecture) or
    the parent (its fingerprint; its name, revision and commit where a fingerprint is missing on either side).
    Accepted: the rest, e.g. `hkt_on_nonfinite`, or the parent's path when its weights are the same.
    """
    new = json.loads(_to_json(new))  # compare what the file will hold (tuples as lists, dtypes as strings)
    differ = {k for k in set(old) | set(new) if k not in _NOT_COMPARED and old.get(k) != new.get(k)}
    by_content = bool(old.get("parent_sha256") and new.get("parent_sha256"))
    strict = set(OBJECTIVE_KEYS) | ({"parent_sha256"} if by_content else set(PARENT_NAME_KEYS))
    return sorted(differ & strict), sorted(differ - strict)


def describe_change(key: str, old: Any, new: Any) -> str:
    return f"{key}: {old!r} -> {new!r}"


def resume_lineage(checkpoint: str | os.PathLike, current: Mapping[str, Any], step: int | None) -> dict[str, Any]:
    """This run's record for a resume from `checkpoint`: refused (ValueError listing old -> new, and how to proceed)
    if the objective or the parent changed; else `current`, plus the accepted changes in `resumed_changes`."""
    path = Path(checkpoint) / HKT_CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"Cannot resume from {checkpoint}: it has no {HKT_CONFIG_NAME}, so the settings it was trained with are "
            f"unknown. Resume from a checkpoint written by HKTTrainer, or {FRESH_START.format(checkpoint=checkpoint)}"
        )
    try:
        old = read_lineage(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"Cannot resume from {checkpoint}: {path} cannot be read ({err}).") from None
    refused, accepted = resume_differences(old, current)
    if refused:
        changes = "\n".join(f"  {describe_change(k, old.get(k), current.get(k))}" for k in refused)
        raise ValueError(
            f"Cannot resume from {checkpoint}: this run's HKT settings differ from those of the run that wrote it "
            f"({path}), old -> new:\n{changes}\nIts optimizer state, schedule and aligners belong to that objective "
            "and parent. Resume with the checkpoint's settings and parent (the old values), or "
            f"{FRESH_START.format(checkpoint=checkpoint)}"
        )
    if accepted:
        listed = "; ".join(describe_change(k, old.get(k), current.get(k)) for k in accepted)
        logger.warning(f"Resuming from {checkpoint} with changed settings that keep its objective and parent "
                       f"({listed}); {HKT_CONFIG_NAME} records them under resumed_changes.")
    changes = [{"step": step, "setting": k, "old": old.get(k), "new": current.get(k)} for k in accepted]
    return {**current, "resumed_changes": old.get("resumed_changes", []) + changes}


def format_lineage(record: dict[str, Any]) -> str:
    """A few readable lines on where a child comes from and how it was trained."""
    get = record.get
    revision = f" @ {get('hkt_parent_revision')}" if get("hkt_parent_revision") else " (revision not pinned)"
    kd = (
        f"{get('hkt_kd_loss')}, weight {get('hkt_kd_weight')}, temperature {get('hkt_kd_temperature')}"
        if get("hkt_kd_weight") else "off"
    )
    weights = ", ".join(f"{w:g}" for w in get("hkt_loss_weights", []))
    identity = f"sha256 {get('parent_sha256') or 'unrecorded'}" + (
        f", Hub commit {get('parent_commit')}" if get("parent_commit") else ""
    )
    lines = [
        f"HKT child ({get('child_architecture') or 'architecture unrecorded'})",
        f"  parent:       {get('hkt_parent') or 'unrecorded'}{revision} (mode: {get('hkt_parent_mode')})",
        f"  parent id:    {identity}",
        f"  carriers:     {', '.join(get('hkt_carriers', []))}",
        f"  gate:         {get('hkt_gate')}, lambda {get('hkt_lambda'):g}",
        f"  loss weights: {weights} (native, child-mixed, parent-head)",
        f"  classic KD:   {kd}",
    ]
    lines += [f"  resumed at step {c.get('step')} with {describe_change(c['setting'], c.get('old'), c.get('new'))}"
              for c in get("resumed_changes", [])]
    return "\n".join(lines)
