"""`HKTConfig`: the HKT settings of a run, saved as `hkt_config.json` beside the child (its lineage record)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .mixture import GATES

HKT_CONFIG_NAME = "hkt_config.json"
FORMAT_VERSION = 1
PARENT_MODES = ("eval", "train-bn")
NONFINITE_POLICIES = ("stop", "skip")
KD_LOSSES = ("kl", "l1", "mse")


@dataclass
class HKTConfig:
    """JSON-serialisable HKT settings. Validation lives here, so every entry point gets the same errors."""

    parent: str | None = None
    parent_revision: str | None = None
    carriers: list[str] = field(default_factory=lambda: ["auto"])
    gate: str = "genetic"
    lam: float = 0.6
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    parent_mode: str = "eval"
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    kd_loss: str = "kl"
    on_nonfinite: str = "stop"
    child_architecture: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"Unknown gate '{self.gate}'. Choose one of: {', '.join(GATES)}.")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"hkt_lambda must lie in [0, 1] (the most the child takes from the parent), got {self.lam}.")
        if len(self.loss_weights) != 3 or any(w < 0 for w in self.loss_weights) or not any(self.loss_weights):
            raise ValueError(
                "hkt_loss_weights must be 3 non-negative numbers, not all zero (native, child-mixed, parent-head), "
                f"got {list(self.loss_weights)}."
            )
        if self.parent_mode not in PARENT_MODES:
            raise ValueError(f"hkt_parent_mode must be one of {PARENT_MODES}, got '{self.parent_mode}'.")
        if self.kd_weight < 0:
            raise ValueError(f"hkt_kd_weight must be >= 0, got {self.kd_weight}.")
        if self.kd_temperature <= 0:
            raise ValueError(f"hkt_kd_temperature must be > 0, got {self.kd_temperature}.")
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(
                f"hkt_kd_loss must be one of {KD_LOSSES} ('kl' for logits, 'l1' or 'mse' for regression outputs such "
                f"as optical flow), got '{self.kd_loss}'."
            )
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"hkt_on_nonfinite must be one of {NONFINITE_POLICIES}, got '{self.on_nonfinite}'.")
        if not self.carriers:
            raise ValueError("hkt_carriers is empty: give at least one carrier, or ['auto'] for the head inputs.")

    def to_json_file(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / HKT_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "HKTConfig":
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise ValueError(
                f"{HKT_CONFIG_NAME} has format_version {version!r}; this hkt-hf reads versions 1..{FORMAT_VERSION}. "
                "Upgrade hkt-hf (pip install -U hkt-hf) to read files written by newer releases."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{HKT_CONFIG_NAME} has unknown fields {unknown}; it was not written by this hkt-hf.")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "HKTConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}.") from err
        return cls.from_dict(data)
