"""`HKTTrainingArguments`: transformers' `TrainingArguments` plus the HKT settings, each defined once, here.

Every `hkt_*` field is a CLI flag through `HfArgumentParser`, is validated in `__post_init__`, and is written to the
child's lineage record `hkt_config.json` (see `lineage.py`) under its own name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .mixture import GATES

PARENT_MODES = ("eval", "train-bn")
NONFINITE_POLICIES = ("stop", "skip")
KD_LOSSES = ("kl", "l1", "mse")
HKT_PREFIX = "hkt_"


@dataclass(frozen=True)
class ObjectiveSettings:
    """What `HKTObjective` needs of the arguments: the weights of the native, child-mixed and parent-head terms, the
    optional KD term and the optional hint term (weight 0 = off)."""

    loss_weights: tuple[float, float, float]
    kd_weight: float
    kd_temperature: float
    kd_loss: str
    hint_weight: float = 0.0


@dataclass
class HKTTrainingArguments(TrainingArguments):
    r"""
    Configuration class for the [`HKTTrainer`].

    Only the parameters specific to Hereditary Knowledge Transfer are listed here; for the others see
    [`~transformers.TrainingArguments`].

    Parameters:
        hkt_parent (`str` or `None`, *optional*, defaults to `None`):
            The parent: a local folder or a Hub id, loaded with the Auto class of the child's task and frozen. May be
            left unset when a model object is passed as `HKTTrainer(parent_model=...)`. A folder holding a PEFT
            adapter (`adapter_config.json`) is loaded on its base model and merged.
        hkt_parent_revision (`str` or `None`, *optional*, defaults to `None`):
            Hub revision (branch, tag or commit) of the parent; recorded in the child's lineage.
        hkt_parent_init_kwargs (`dict[str, Any]` or `str` or `None`, *optional*, defaults to `None`):
            Keyword arguments for the parent's `from_pretrained` (e.g. `{"dtype": "bfloat16",
            "attn_implementation": "sdpa"}`); a JSON string on the command line.
        hkt_carriers (`list[str]`, *optional*, defaults to `["auto"]`):
            Carrier pairs `"parent.module=child.module"` (append `:input` to take a module's input), `"auto"` for
            the inputs of the modules that produce the two models' predictions (the reference), or `"blocks"` for the
            outputs of up to 3 of the child's blocks (decoder layers, residual blocks) paired with the parent's blocks
            at the same relative depths (not the paper's formula; see `docs/which-configuration.md`). Several
            carriers give multi-stage transfer.
        hkt_gate (`str`, *optional*, defaults to `"genetic"`):
            Mixture gate: `"genetic"` (the reference formula), `"agreement"`, `"constant"` (w = lambda), `"static"` or
            `"learned"`.
        hkt_lambda (`float`, *optional*, defaults to `0.6`):
            The most the child takes from the parent, in [0, 1].
        hkt_loss_weights (`list[float]`, *optional*, defaults to `[1.0, 1.0, 1.0]`):
            Weights of the native, child-mixed and parent-head loss terms; a term of weight 0 is not computed. All
            zero with `hkt_kd_weight > 0` trains on the KD term alone (KL-only distillation).
        hkt_parent_mode (`str`, *optional*, defaults to `"eval"`):
            `"eval"` (frozen statistics) or `"train-bn"` (batch-norm layers in train mode, as the reference code).
        hkt_kd_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an optional classic knowledge-distillation term (0 = off).
        hkt_kd_temperature (`float`, *optional*, defaults to `4.0`):
            Temperature of the `"kl"` distillation term.
        hkt_kd_loss (`str`, *optional*, defaults to `"kl"`):
            `"kl"` (Hinton, on logits) or, for regression outputs such as optical flow, `"l1"` or `"mse"`.
        hkt_hint_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an optional hint term (FitNets): at every carrier, the MSE between the child's feature mapped
            into the parent's space (by the carrier's child -> parent aligner, trained with it) and the parent's
            feature, as a mean over the batch's items like every term: the positions with a target for token tasks, else
            the samples, each over its real positions (0 = off).
        hkt_on_nonfinite (`str`, *optional*, defaults to `"stop"`):
            What a NaN/inf loss part or carrier feature does: `"stop"` raises, naming the step and the culprit
            (saved checkpoints stay intact); `"skip"` drops the batch, leaving no trace in any buffer (single
            process only).
    """

    hkt_parent: str | None = field(
        default=None,
        metadata={"help": "Parent model: a local folder or Hub id, loaded with the child's Auto class. Frozen."},
    )
    hkt_parent_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of the parent."}
    )
    hkt_parent_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "JSON keyword arguments for the parent's from_pretrained, e.g. '{\"dtype\": \"bfloat16\"}'."},
    )
    hkt_carriers: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Carrier pairs 'parent.module=child.module' (append ':input' to take a module's input), or "
            "'auto' for the inputs of the prediction heads, or 'blocks' for up to 3 child blocks paired with the "
            "parent's at the same relative depths. Several carriers give multi-stage transfer."
        },
    )
    hkt_gate: str = field(
        default="genetic",
        metadata={"help": f"Mixture gate: one of {', '.join(GATES)}. 'genetic' is the reference formula."},
    )
    hkt_lambda: float = field(
        default=0.6, metadata={"help": "lambda in [0, 1]: the most the child takes from the parent (0.6 reference)."}
    )
    hkt_loss_weights: list[float] = field(
        default_factory=lambda: [1.0, 1.0, 1.0],
        metadata={"help": "Weights of the native, child-mixed and parent-head loss terms (0 skips a term)."},
    )
    hkt_parent_mode: str = field(
        default="eval",
        metadata={"help": "'eval' (frozen statistics) or 'train-bn' (batch-norm in train mode, as the reference code)."},
    )
    hkt_kd_weight: float = field(default=0.0, metadata={"help": "Weight of an optional classic KD term (0 = off)."})
    hkt_kd_temperature: float = field(default=4.0, metadata={"help": "Temperature of the KD term ('kl' only)."})
    hkt_kd_loss: str = field(
        default="kl",
        metadata={
            "help": "KD term: 'kl' (Hinton, on logits) or, for regression outputs such as optical flow, 'l1' or "
            "'mse' between the child's and the parent's predictions."
        },
    )
    hkt_hint_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an optional hint term: MSE between the child's carrier features mapped into the "
                          "parent's space and the parent's (FitNets; 0 = off)."},
    )
    hkt_on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "What to do when a loss part or carrier feature is NaN/inf: 'stop' raises (naming the step and "
            "culprit; saved checkpoints stay intact) or 'skip' drops the batch (single process only)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.hkt_carriers, str):  # a Python caller's hkt_carriers="auto": one entry, not letters
            self.hkt_carriers = [self.hkt_carriers]
        if isinstance(self.hkt_parent_init_kwargs, str):
            try:
                self.hkt_parent_init_kwargs = json.loads(self.hkt_parent_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"hkt_parent_init_kwargs must be a JSON object such as '{{\"dtype\": \"bfloat16\"}}', got "
                    f"{self.hkt_parent_init_kwargs!r} ({err})."
                ) from None
        self.hkt_carriers = list(self.hkt_carriers)
        self.hkt_loss_weights = [float(w) for w in self.hkt_loss_weights]
        validate_hkt_settings(self.hkt_settings())
        check_parent_path(self.hkt_parent, self.output_dir)

    def objective_settings(self) -> "ObjectiveSettings":
        """The settings one training step's objective uses, as a typed object read once."""
        w0, w1, w2 = self.hkt_loss_weights
        return ObjectiveSettings((w0, w1, w2), self.hkt_kd_weight, self.hkt_kd_temperature, self.hkt_kd_loss,
                                 self.hkt_hint_weight)

    def hkt_settings(self) -> dict[str, Any]:
        """The `hkt_*` fields by name: what the lineage record holds and what `validate_hkt_settings` checks."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(HKT_PREFIX)}


@dataclass
class HKTSeq2SeqTrainingArguments(HKTTrainingArguments, Seq2SeqTrainingArguments):
    r"""
    Configuration class for the [`HKTSeq2SeqTrainer`]: [`HKTTrainingArguments`] plus transformers'
    [`~transformers.Seq2SeqTrainingArguments`] (`predict_with_generate`, `generation_max_length`, ...).
    """


def hkt_field_names() -> set[str]:
    return {f.name for f in fields(HKTTrainingArguments) if f.name.startswith(HKT_PREFIX)}


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _one_of(name: str, value: Any, choices: Any, why: str = "") -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}{why}, got {value!r}.")


def validate_hkt_settings(settings: Mapping[str, Any]) -> None:
    """Check the `hkt_*` settings present in `settings`; each error names the field and what it accepts.

    Shared by `HKTTrainingArguments.__post_init__` and the lineage reader, so a record read back from a pulled child
    meets the same rules as the run that wrote it.
    """
    unknown = sorted(set(settings) - hkt_field_names())
    if unknown:
        raise ValueError(f"Unknown HKT settings {unknown}; known: {sorted(hkt_field_names())}.")
    get = settings.get
    if "hkt_carriers" in settings:
        carriers = get("hkt_carriers")
        if not carriers or not all(isinstance(c, str) and c.strip() for c in carriers):
            raise ValueError(
                f"hkt_carriers must be a non-empty list of 'parent.module=child.module' strings or ['auto'] or ['blocks'], got "
                f"{carriers!r}."
            )
    if "hkt_gate" in settings:
        _one_of("hkt_gate", get("hkt_gate"), tuple(GATES))
    if "hkt_lambda" in settings and not 0.0 <= _finite("hkt_lambda", get("hkt_lambda")) <= 1.0:
        raise ValueError(f"hkt_lambda must lie in [0, 1] (the most the child takes from the parent), got "
                         f"{get('hkt_lambda')}.")
    if "hkt_loss_weights" in settings:
        weights = list(get("hkt_loss_weights"))
        if len(weights) != 3:
            raise ValueError(f"hkt_loss_weights must be 3 numbers (native, child-mixed, parent-head), got {weights}.")
        weights = [_finite("hkt_loss_weights", w) for w in weights]
        extra = [get(name) for name in ("hkt_kd_weight", "hkt_hint_weight")]
        extra_only = any(isinstance(w, (int, float)) and w > 0 for w in extra)
        if any(w < 0 for w in weights) or not (any(weights) or extra_only):
            raise ValueError(
                f"hkt_loss_weights must be non-negative and not all zero (native, child-mixed, parent-head), got "
                f"{weights}; all zero is allowed only with hkt_kd_weight > 0 or hkt_hint_weight > 0 (training on "
                "those terms alone)."
            )
    if "hkt_parent_mode" in settings:
        _one_of("hkt_parent_mode", get("hkt_parent_mode"), PARENT_MODES)
    if "hkt_kd_weight" in settings and _finite("hkt_kd_weight", get("hkt_kd_weight")) < 0:
        raise ValueError(f"hkt_kd_weight must be >= 0 (0 turns KD off), got {get('hkt_kd_weight')}.")
    if "hkt_hint_weight" in settings and _finite("hkt_hint_weight", get("hkt_hint_weight")) < 0:
        raise ValueError(f"hkt_hint_weight must be >= 0 (0 turns the hint term off), got {get('hkt_hint_weight')}.")
    if "hkt_kd_temperature" in settings and _finite("hkt_kd_temperature", get("hkt_kd_temperature")) <= 0:
        raise ValueError(f"hkt_kd_temperature must be > 0, got {get('hkt_kd_temperature')}.")
    if "hkt_kd_loss" in settings:
        _one_of("hkt_kd_loss", get("hkt_kd_loss"), KD_LOSSES,
                " ('kl' for logits, 'l1' or 'mse' for regression outputs such as optical flow)")
    if "hkt_on_nonfinite" in settings:
        _one_of("hkt_on_nonfinite", get("hkt_on_nonfinite"), NONFINITE_POLICIES)
    init_kwargs = get("hkt_parent_init_kwargs")
    if init_kwargs is not None and not isinstance(init_kwargs, Mapping):
        raise ValueError(f"hkt_parent_init_kwargs must be a dict of from_pretrained arguments, got {init_kwargs!r}.")


def is_hub_id(name: str) -> bool:
    """True for a name the Hub could hold (`org/model`); local paths such as `./x` or `/x` are not."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_parent_path(parent: str | None, output_dir: str | None) -> None:
    """Refuse a parent path that does not exist or is a file, and an `output_dir` that would overwrite the parent on
    save."""
    if parent is None:
        return
    if os.path.isfile(parent):
        raise ValueError(
            f"hkt_parent={parent!r} is a file: the parent must be a folder or a Hub id, not a file. Give the folder "
            "that holds its config.json (and weights), e.g. the folder save_pretrained() wrote."
        )
    if not os.path.exists(parent) and not is_hub_id(parent):
        raise ValueError(
            f"hkt_parent={parent!r} is neither an existing local folder nor a Hub repo id ('org/name'). Check the "
            "path (relative paths are resolved from the current directory)."
        )
    if output_dir and os.path.isdir(parent) and Path(output_dir).resolve() == Path(parent).resolve():
        raise ValueError(
            f"output_dir {output_dir!r} is the parent's folder: saving the child would overwrite the parent. Choose "
            "another output_dir."
        )
