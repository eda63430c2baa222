"""`Trainer.hyperparameter_search` over `hkt_*` settings.

`Trainer.train` builds the trial's child with `model_init` first and only then sets the trial's values on `args`,
so the child's adapter and objective (built in `call_model_init`) would take the previous trial's `hkt_*` values,
and its lineage the trainer's. `HKTTrainer.train` sets a trial's `hkt_*` values before that, cast as the Trainer
casts them and checked as `HKTTrainingArguments` checks its fields. The parent, loaded once when the trainer is
made, is not searchable.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer
from transformers.trainer_utils import HPSearchBackend

from .training_args import HKT_PREFIX, validate_hkt_settings

# Settings that choose the parent: it is loaded, checked and fingerprinted once, when the trainer is made.
PARENT_SETTINGS = ("hkt_parent", "hkt_parent_revision", "hkt_parent_init_kwargs")


def trial_hkt_settings(trainer: Trainer, trial: Any) -> dict[str, Any]:
    """The `hkt_*` values `trial` sets (none outside a search), as the Trainer will set them: refused with a clear
    error if they choose the parent, give a list setting as a string, or are invalid."""
    if trial is None or trainer.hp_search_backend is None:
        return {}
    params = trainer.hp_space(trial) if trainer.hp_search_backend == HPSearchBackend.OPTUNA else trial
    requested = {key: value for key, value in params.items() if key.startswith(HKT_PREFIX)}
    if parent_keys := sorted(set(requested) & set(PARENT_SETTINGS)):
        raise ValueError(
            f"A hyperparameter search trial sets {parent_keys}: the parent is loaded once, when the trainer is made, "
            "and cannot change between trials. Run one search (one HKTTrainer) per parent."
        )
    current = trainer.args.hkt_settings()
    settings = {}
    for key, value in requested.items():
        old = current.get(key)
        if isinstance(old, list) and isinstance(value, str):
            raise ValueError(
                f"A hyperparameter search trial sets {key}={value!r}: give it as a list ([{value!r}]); the Trainer "
                "casts a trial's value to the field's type, which would split a string into its characters."
            )
        settings[key] = type(old)(value) if old is not None else value  # Trainer._hp_search_setup's cast
    validate_hkt_settings(current | settings)
    return settings
