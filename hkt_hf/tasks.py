"""Which task a model solves, and which Auto class loads it, read from transformers' own Auto mappings.

A model class belongs to a task when one of the task's Auto classes maps a config to it: either by name in the
built-in table (`MODEL_FOR_*_MAPPING_NAMES`, no model module is imported) or as content registered at run time
(`AutoModelForImageClassification.register(...)`, as `hkt_hf` does for its CIFAR ResNets). Tasks are checked in the
order below, so a class listed under several Auto classes gets its most specific one; the headless `AutoModel` comes
last and has no task.
"""

from __future__ import annotations

import transformers
from torch import nn

from .compat import auto_model_class, auto_registered, auto_table_names, has_causal_lm_only
from .model_state import base_of

# (pipeline-style task, Auto class name), most specific first.
TASK_AUTO_CLASSES: tuple[tuple[str, str], ...] = (
    ("text-generation", "AutoModelForCausalLM"),
    ("text2text-generation", "AutoModelForSeq2SeqLM"),
    ("fill-mask", "AutoModelForMaskedLM"),
    ("text-classification", "AutoModelForSequenceClassification"),
    ("token-classification", "AutoModelForTokenClassification"),
    ("question-answering", "AutoModelForQuestionAnswering"),
    ("multiple-choice", "AutoModelForMultipleChoice"),
    ("image-classification", "AutoModelForImageClassification"),
    ("audio-classification", "AutoModelForAudioClassification"),
    ("video-classification", "AutoModelForVideoClassification"),
    ("image-segmentation", "AutoModelForSemanticSegmentation"),
    ("object-detection", "AutoModelForObjectDetection"),
    ("depth-estimation", "AutoModelForDepthEstimation"),
    ("automatic-speech-recognition", "AutoModelForSpeechSeq2Seq"),
    ("automatic-speech-recognition", "AutoModelForCTC"),
    ("image-text-to-text", "AutoModelForImageTextToText"),
    ("image-to-image", "AutoModelForImageToImage"),
)
HEADLESS_AUTO_CLASS = "AutoModel"

# Task categories, defined here once. Language models: their head is the output embeddings.
LM_TASKS = frozenset({"text-generation", "text2text-generation", "fill-mask"})
# One target per token: language models and token classifiers.
TOKEN_TASKS = LM_TASKS | {"token-classification"}
# One target per sample.
SEQUENCE_TASKS = frozenset({"text-classification", "image-classification", "audio-classification",
                            "video-classification"})
# Extractive question answering: start and end positions.
QA_TASK = "question-answering"
# Models that predict labels from `config.num_labels` (per sample, or per token).
CLASSIFICATION_TASKS = SEQUENCE_TASKS | {"token-classification"}


def base_model_class(model_or_class: nn.Module | type) -> type:
    """The class of the transformers model itself: a PEFT wrapper is unwrapped with `get_base_model()`."""
    return model_or_class if isinstance(model_or_class, type) else type(base_of(model_or_class))


def _maps(auto_class: type, cls: type) -> bool:
    """Whether `auto_class` loads exactly `cls`: registered at run time, or listed by name in transformers' table."""
    if any(registered is cls for registered in auto_registered(auto_class)):
        return True
    return cls.__module__.startswith("transformers.") and cls.__name__ in set(auto_table_names(auto_class))


def _auto_class(cls: type) -> tuple[str | None, type] | None:
    """(task, Auto class) for `cls` itself, not its bases; None when no Auto class lists it."""
    for task, name in TASK_AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None and _maps(auto, cls):
            return task, auto
    return (None, transformers.AutoModel) if _maps(transformers.AutoModel, cls) else None


def _lookup(model_or_class: nn.Module | type) -> tuple[str | None, type] | None:
    """(task, Auto class) of the first class in the model's MRO that an Auto class lists (subclasses inherit)."""
    for cls in base_model_class(model_or_class).__mro__:
        found = _auto_class(cls)
        if found is not None:
            return found
    return None


def task_of(model_or_class: nn.Module | type) -> str | None:
    """Pipeline-style task of a model or model class ("text-generation", "image-classification", ...); None when
    only the headless `AutoModel` (or no Auto class) knows it."""
    found = _lookup(model_or_class)
    return found[0] if found else None


def loss_task(model_or_class: nn.Module | type) -> str | None:
    """The task whose head and loss the model has, for the losses HKT computes itself: `task_of`, except that speech
    sequence-to-sequence models (Whisper; `AutoModelForSpeechSeq2Seq`) are sequence-to-sequence LMs
    ("text2text-generation": an output-embedding head, token cross-entropy over the decoder's labels)."""
    found = _lookup(model_or_class)
    if found is None:
        return None
    return "text2text-generation" if found[1].__name__ == "AutoModelForSpeechSeq2Seq" else found[0]


def auto_class_for(model_or_class: nn.Module | type) -> type:
    """The Auto class that loads this model with its head (e.g. `AutoModelForCausalLM` for `LlamaForCausalLM`);
    `AutoModel` only for models no task-specific Auto class lists."""
    found = _lookup(model_or_class)
    if found is None:
        cls = base_model_class(model_or_class)
        raise ValueError(
            f"No transformers Auto class loads {cls.__name__}: register it first, e.g. "
            f"AutoModelForImageClassification.register({cls.__name__}.config_class, {cls.__name__})."
        )
    return found[1]


def is_classifier(model: nn.Module | type) -> bool:
    """Whether the model predicts `config.num_labels` classes (per sample or per token)."""
    return task_of(model) in CLASSIFICATION_TASKS


def reads_last_token(model: nn.Module | type) -> bool:
    """Whether a sequence classifier reads its last real token (decoder-only models such as GPT-2, Llama, Qwen2) rather
    than its first: true for model types with a causal LM and no masked LM in transformers' tables."""
    config = getattr(base_model_class(model), "config_class", None)
    model_type = getattr(config, "model_type", None)
    return has_causal_lm_only(model_type)


def task_of_saved(config: object, architecture: str) -> tuple[str | None, str]:
    """(task, Auto class name) of a saved model from its config and recorded architecture name, for a folder whose
    model is not loaded (e.g. when pushing it); (None, "AutoModel") when no task-specific Auto class maps it."""
    for task, name in TASK_AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        cls = auto_model_class(auto, config) if auto is not None else None
        if cls is not None and cls.__name__ == architecture:
            return task, name
    return None, HEADLESS_AUTO_CLASS
