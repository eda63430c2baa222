"""How each pass of a training step is fed: the batch without its targets where the loss is computed elsewhere, the
decoder inputs an encoder-decoder builds from its labels, no KV cache, and batch-norm statistics that count each
batch once per model. Used by the objective and by the probe before training."""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from functools import lru_cache
from typing import Any

from torch import nn
from transformers.utils import find_labels

from .compat import labels_shifted_right
from .model_state import base_of


@lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def model_label_names(model: nn.Module) -> list[str]:
    """The names of the model's targets as the Trainer infers them from its forward (`labels`; `start_positions` and
    `end_positions` for extractive QA), plus `labels`."""
    return sorted(set(find_labels(type(base_of(model)))) | {"labels"})


def model_inputs(inputs: dict[str, Any], label_names: Collection[str] = ("labels",)) -> dict[str, Any]:
    """The batch without its targets (`labels`, or the names given), for passes whose loss is computed elsewhere."""
    return {k: v for k, v in inputs.items() if k not in label_names}


def without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with `use_cache=False` where the model's forward takes it. With a cache, transformers does not read
    packed sequences (padding-free batches: `position_ids`, no attention mask) as separate, so they would attend to
    each other; the Trainer turns the child's cache off (`args.use_cache`), never the parent's."""
    if "use_cache" in _forward_parameters(type(base_of(model))):
        return {**kwargs, "use_cache": False}
    return kwargs


def forward_inputs(model: nn.Module, inputs: dict[str, Any], label_names: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """The batch without its targets (`label_names`, by default the model's own) and without a cache, for passes whose
    loss is computed here rather than by the model; an encoder-decoder gets the decoder inputs it would build from
    the labels (`prepare_decoder_input_ids_from_labels`, else the labels shifted right as Whisper or BART do)."""
    out = model_inputs(inputs, {*(model_label_names(model) if label_names is None else label_names), "labels"})
    base = base_of(model)
    if (getattr(base.config, "is_encoder_decoder", False) and "decoder_input_ids" not in out
            and inputs.get("labels") is not None):
        prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare):
            out["decoder_input_ids"] = prepare(labels=inputs["labels"])
        else:
            out["decoder_input_ids"] = labels_shifted_right(inputs["labels"], base.config.pad_token_id,
                                                          base.config.decoder_start_token_id)
    return without_cache(model, out)


