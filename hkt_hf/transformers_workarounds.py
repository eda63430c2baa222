"""The one place where hkt-hf touches a private `Trainer` member, to work around a transformers bug.

transformers 5 saves some models (e.g. ViT, Qwen2.5-VL) under their original checkpoint key names
(`vit.encoder.layer.*` for `vit.layers.*`), but `Trainer._load_from_checkpoint` loads `model.safetensors` with a
plain `load_state_dict(strict=False)`: resuming such a model only warns and continues from fresh weights.
Upstream: https://github.com/huggingface/transformers/issues/43701. Remove this module once a fixed transformers
release is the minimum supported one.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import SAFE_WEIGHTS_NAME


def load_runtime_state_dict(model: PreTrainedModel, weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's `model.safetensors` with its keys renamed to `model.state_dict()`'s names."""
    try:
        saved = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"Cannot read checkpoint weights {weights_file} ({err}): the file is truncated or corrupt. Resume from an "
            "earlier checkpoint of the same run."
        ) from err
    runtime = model.state_dict()
    name_of = {id(t): k for k, t in runtime.items()}
    saved_to_runtime = {k: name_of[id(t)] for k, t in revert_weight_conversion(model, runtime).items() if id(t) in name_of}
    return {saved_to_runtime.get(k, k): v for k, v in saved.items()}


class ResumeWithWeightConversion(Trainer):
    """`Trainer` whose resume reads back the key names `save_pretrained` wrote (issue 43701)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        child = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)
        if self.is_fsdp_enabled or not isinstance(child, PreTrainedModel) or not os.path.isfile(weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._issue_warnings_after_load(child.load_state_dict(load_runtime_state_dict(child, weights), strict=False))
