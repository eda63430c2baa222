"""`HKTTrainingArguments`: transformers' `TrainingArguments` plus the HKT settings (every field is a CLI flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config import HKTConfig
from .mixture import GATES


@dataclass
class HKTTrainingArguments(TrainingArguments):
    """Training arguments for `HKTTrainer`. The `hkt_*` fields are validated by `HKTConfig` at construction."""

    hkt_parent: str | None = field(
        default=None,
        metadata={"help": "Parent model: a local path or Hub id, loaded with the child's Auto class. Frozen."},
    )
    hkt_parent_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of the parent."}
    )
    hkt_carriers: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Carrier pairs 'parent.module=child.module' (append ':input' to take a module's input), or "
            "'auto' for the inputs of the classification heads. Several carriers give multi-stage transfer."
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
        metadata={"help": "Weights of the native, child-mixed and parent-head loss terms."},
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
    hkt_on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "What to do when a loss part or carrier feature is NaN/inf: 'stop' raises (naming the step and "
            "carrier; saved checkpoints stay intact) or 'skip' drops the batch (single process only)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.to_hkt_config()

    def to_hkt_config(self, **overrides) -> HKTConfig:
        """The HKT settings as an `HKTConfig` (validated); `overrides` fill in what only the trainer knows."""
        values = dict(
            parent=self.hkt_parent,
            parent_revision=self.hkt_parent_revision,
            carriers=list(self.hkt_carriers),
            gate=self.hkt_gate,
            lam=self.hkt_lambda,
            loss_weights=[float(w) for w in self.hkt_loss_weights],
            parent_mode=self.hkt_parent_mode,
            kd_weight=self.hkt_kd_weight,
            kd_temperature=self.hkt_kd_temperature,
            kd_loss=self.hkt_kd_loss,
            on_nonfinite=self.hkt_on_nonfinite,
        )
        values.update(overrides)
        return HKTConfig(**values)
