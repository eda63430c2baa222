"""The one place where hkt-hf touches private `Trainer` members, to work around a transformers bug.

transformers 5 saves some models under their original checkpoint key names (ViT: `vit.encoder.layer.*` for
`vit.layers.*`) or in another layout (Mixtral: one tensor per expert for the fused `experts.gate_up_proj`), but
`Trainer._load_from_checkpoint` (resume) and `Trainer._load_best_model` (`load_best_model_at_end`) load
`model.safetensors` with a plain `load_state_dict(strict=False)`: such a model only warns and goes on with the
weights it had. Upstream: https://github.com/huggingface/transformers/issues/43701. Remove this module once a fixed
transformers release is the minimum supported one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

logger = logging.get_logger(__name__)


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a saved model's weights (one file, or the shards its index lists); [] if none."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def _read(weights_file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"Cannot read checkpoint weights {weights_file} ({err}): the file is truncated or corrupt. Resume from an "
            "earlier checkpoint of the same run."
        ) from err


def load_runtime_state_dict(model: PreTrainedModel, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights saved in `folder` under `model.state_dict()`'s names. Renamed keys are mapped back directly; a
    layout that is not a renaming (merged or split tensors) is read with `from_pretrained`, which converts it."""
    saved = {key: value for path in weight_files(folder) for key, value in _read(path).items()}
    runtime = model.state_dict()
    name_of = {id(t): k for k, t in runtime.items()}
    reverted = revert_weight_conversion(model, runtime)
    saved_to_runtime = {k: name_of[id(t)] for k, t in reverted.items() if id(t) in name_of}
    renamed = {saved_to_runtime.get(k, k): v for k, v in saved.items()}
    if set(renamed) <= set(runtime):
        return renamed
    loaded, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"The weights in {folder} are not this {type(model).__name__}'s: missing "
            f"{sorted(info['missing_keys'])[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}."
        )
    return loaded.state_dict()


class ResumeWithWeightConversion(Trainer):
    """`Trainer` whose resume and best-model loading read back the key names `save_pretrained` wrote (issue 43701)."""

    def _converting_load_applies(self, child: nn.Module, folder: str) -> bool:
        return not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and isinstance(child, PreTrainedModel) and bool(
            weight_files(folder)
        )

    def _load_converted(self, child: PreTrainedModel, folder: str) -> None:
        self._issue_warnings_after_load(child.load_state_dict(load_runtime_state_dict(child, folder), strict=False))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        child = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not self._converting_load_applies(child, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_converted(child, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        child = self.accelerator.unwrap_model(self.model)
        folder = self.state.best_model_checkpoint
        if not self._converting_load_applies(child, folder):
            return super()._load_best_model()
        logger.info(f"Loading best model from {folder} (score: {self.state.best_metric}).")
        self._load_converted(child, folder)
