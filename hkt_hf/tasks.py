"""Which task a model solves, from transformers' own model mappings (including classes registered with them)."""

from __future__ import annotations

import transformers
from torch import nn
from transformers.models.auto import modeling_auto as auto

# (pipeline task, Auto class, mapping), most specific first. The mappings are the ones the Auto classes register into.
TASKS: list[tuple[str, str, object]] = [
    ("text-generation", "AutoModelForCausalLM", auto.MODEL_FOR_CAUSAL_LM_MAPPING),
    ("text2text-generation", "AutoModelForSeq2SeqLM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING),
    ("fill-mask", "AutoModelForMaskedLM", auto.MODEL_FOR_MASKED_LM_MAPPING),
    ("text-classification", "AutoModelForSequenceClassification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING),
    ("token-classification", "AutoModelForTokenClassification", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING),
    ("question-answering", "AutoModelForQuestionAnswering", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING),
    ("image-classification", "AutoModelForImageClassification", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING),
    ("audio-classification", "AutoModelForAudioClassification", auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING),
    ("image-segmentation", "AutoModelForSemanticSegmentation", auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING),
]
CLASSIFICATION_TASKS = ("text-classification", "image-classification", "audio-classification")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model behind a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def task_entry(config: object, architecture: str) -> tuple[str, str] | None:
    """(pipeline task, Auto class name) of the model class named `architecture` for `config`, if a mapping has it."""
    for task, auto_name, mapping in TASKS:
        try:
            cls = mapping[type(config)]
        except KeyError:
            continue
        if cls.__name__ == architecture:
            return task, auto_name
    return None


def _task_entry(model: nn.Module) -> tuple[str, str] | None:
    model = base_model(model)
    config = getattr(model, "config", None)
    return None if config is None else task_entry(config, type(model).__name__)


def task_of(model: nn.Module) -> str | None:
    """The pipeline task of `model` ("text-generation", "image-classification", ...), or None if unknown."""
    entry = _task_entry(model)
    return entry[0] if entry else None


def auto_class_for(model: nn.Module) -> type:
    """The Auto class that loads a model like `model` with its head (`AutoModel` only for models without one)."""
    entry = _task_entry(model)
    return getattr(transformers, entry[1]) if entry else transformers.AutoModel


def is_classifier(model: nn.Module) -> bool:
    return task_of(model) in CLASSIFICATION_TASKS
