"""The one module that touches private names of transformers and torch; when a release changes them, this is the file
to fix (`tests/test_compat.py` fails when another module touches one).

- Small accessors for what transformers and torch only expose privately: the Auto classes' tables, the module classes
  a model keeps whole (`_no_split_modules`, its repeated blocks), the state-dict keys `save_pretrained` leaves out,
  batch-norm layers, and the decoder inputs an encoder-decoder builds from its labels.
- The override of two private `Trainer` members for a transformers bug. transformers 5 saves some models under their
  original checkpoint key names (ViT: `vit.encoder.layer.*` for `vit.layers.*`) or in another layout (Mixtral: one
  tensor per expert for the fused `experts.gate_up_proj`), but `Trainer._load_from_checkpoint` (resume) and
  `Trainer._load_best_model` (`load_best_model_at_end`) load `model.safetensors` with a plain
  `load_state_dict(strict=False)`: such a model only warns and goes on with the weights it had. Upstream:
  https://github.com/huggingface/transformers/issues/43701. Remove the override once a fixed transformers release is
  the minimum supported one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.auto import modeling_auto
from transformers.models.bart.modeling_bart import shift_tokens_right
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


# ---- accessors ----------------------------------------------------------------------------------------------------


def auto_table_names(auto_class: type) -> Iterator[str]:
    """Names of the model classes in an Auto class's built-in table (values may be one name or several)."""
    for value in auto_class._model_mapping._model_mapping.values():
        yield from (value,) if isinstance(value, str) else value


def auto_registered(auto_class: type) -> Iterator[type]:
    """The model classes registered with an Auto class at run time (`AutoModelFor...register`)."""
    yield from auto_class._model_mapping._extra_content.values()


def auto_model_class(auto_class: type, config: object) -> type | None:
    """The model class an Auto class loads for a config of this type; None when it maps none."""
    try:
        return auto_class._model_mapping[type(config)]
    except KeyError:
        return None


def has_causal_lm_only(model_type: str | None) -> bool:
    """Whether transformers' tables list a causal LM and no masked LM for this model type (a decoder-only model)."""
    return (model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def no_split_module_classes(model: nn.Module) -> set[str]:
    """Names of the module classes a transformers model keeps whole when it is split (`_no_split_modules`): its
    blocks (decoder layers, residual blocks), sometimes its embeddings."""
    return set(getattr(model, "_no_split_modules", None) or ())


def keys_ignored_on_save(model: nn.Module) -> set[str] | None:
    """transformers' per-model set of state-dict keys that `save_pretrained` leaves out (None for plain modules); the
    set itself, so that a caller may add keys for as long as a module is attached."""
    keys = getattr(model, "_keys_to_ignore_on_save", None)
    return keys if isinstance(keys, set) else None


def is_batch_norm(module: nn.Module) -> bool:
    """Whether `module` is one of torch's batch-norm layers (1d/2d/3d, lazy, sync)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def labels_shifted_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """The decoder inputs an encoder-decoder without `prepare_decoder_input_ids_from_labels` builds from its labels
    (Whisper, BART): the labels shifted right after the start token, -100 replaced by padding."""
    return shift_tokens_right(labels, pad_token_id, decoder_start_token_id)


def hub_commit(config: object) -> str | None:
    """The Hub commit a model's config was pulled at (`from_pretrained` of a Hub id records it); None otherwise."""
    return getattr(config, "_commit_hash", None)
