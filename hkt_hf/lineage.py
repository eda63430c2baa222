"""The lineage record `hkt_config.json`: where a child comes from and how it was trained.

It holds the run's `hkt_*` settings under their `HKTTrainingArguments` field names (the parent and carriers as
resolved by the trainer), the child's architecture and a format version. Nothing here lists the fields again: the
record is derived from the arguments, and read back through the same validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .training_args import HKTTrainingArguments, validate_hkt_settings

HKT_CONFIG_NAME = "hkt_config.json"
FORMAT_VERSION = 2
RECORD_KEYS = ("format_version", "child_architecture")
# Version 1 (hkt-hf 0.1) wrote the settings without the prefix, and lambda as `lam`.
_V1_RENAMED = {"lam": "hkt_lambda"}


def lineage_record(
    args: HKTTrainingArguments, *, parent: str | None, carriers: list[str], child_architecture: str
) -> dict[str, Any]:
    """The record of a run: `args`' HKT settings with the parent's name and the resolved carrier pairs."""
    record = args.hkt_settings()
    record.update(hkt_parent=parent, hkt_carriers=list(carriers))
    return {"format_version": FORMAT_VERSION, "child_architecture": child_architecture, **record}


def write_lineage(record: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write `record` to `directory/hkt_config.json` atomically."""
    path = Path(directory) / HKT_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def parse_lineage(data: dict[str, Any]) -> dict[str, Any]:
    """Check a record read from JSON (upgrading version 1), refusing unknown versions, fields and values."""
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{HKT_CONFIG_NAME} has format_version {version!r}; this hkt-hf reads versions 1..{FORMAT_VERSION}. "
            "Upgrade hkt-hf (pip install -U hkt-hf) to read files written by newer releases."
        )
    if version == 1:
        data = {k if k in RECORD_KEYS else _V1_RENAMED.get(k, "hkt_" + k): v for k, v in data.items()}
    settings = {k: v for k, v in data.items() if k not in RECORD_KEYS}
    try:
        validate_hkt_settings(settings)
    except ValueError as err:
        raise ValueError(f"{HKT_CONFIG_NAME} is not a valid lineage record: {err}") from None
    return {**data, "format_version": FORMAT_VERSION}


def read_lineage(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from err
    return parse_lineage(data)


def format_lineage(record: dict[str, Any]) -> str:
    """A few readable lines on where a child comes from and how it was trained."""
    get = record.get
    revision = f" @ {get('hkt_parent_revision')}" if get("hkt_parent_revision") else " (revision not pinned)"
    kd = (
        f"{get('hkt_kd_loss')}, weight {get('hkt_kd_weight')}, temperature {get('hkt_kd_temperature')}"
        if get("hkt_kd_weight") else "off"
    )
    weights = ", ".join(f"{w:g}" for w in get("hkt_loss_weights", []))
    return "\n".join(
        [
            f"HKT child ({get('child_architecture') or 'architecture unrecorded'})",
            f"  parent:       {get('hkt_parent') or 'unrecorded'}{revision} (mode: {get('hkt_parent_mode')})",
            f"  carriers:     {', '.join(get('hkt_carriers', []))}",
            f"  gate:         {get('hkt_gate')}, lambda {get('hkt_lambda'):g}",
            f"  loss weights: {weights} (native, child-mixed, parent-head)",
            f"  classic KD:   {kd}",
        ]
    )
