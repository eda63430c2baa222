"""The parent: loading it for the child's task, checking it can teach the child, and freezing it for one run only.

It can teach only if its checkpoint covers the model it is loaded as (no head left at random), it solves the child's
task with the same labels, its weights are finite, and, for models that read token ids, its token ids mean the
child's tokens (`check_vocabularies`).

The user's parent object is never changed for good: `frozen` sets `requires_grad=False` and the run's mode
(`eval`, or batch-norm in train mode for `train-bn`) for a training run (and around each step, for callers of
`compute_loss`) and restores both after it, so trainers sharing one parent never see each other's settings, and no
gradient ever reaches its weights. Its dtype is left alone: features cross between the two models through
the aligners, which cast them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import is_batch_norm
from .model_state import base_of, whole_state
from .tasks import auto_class_for, is_classifier, task_of

PEFT_ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def load_parent(name: str, child: nn.Module, revision: str | None, init_kwargs: dict[str, Any] | None) -> nn.Module:
    """Load a parent by path or Hub id with the Auto class of the child's task (never a headless model for a child
    with a head), refusing weights that do not cover it. A folder holding a PEFT adapter is loaded on its base model
    and merged: the parent is frozen."""
    kwargs = dict(init_kwargs or {})
    if revision is not None:
        kwargs.setdefault("revision", revision)
    auto_class = auto_class_for(child)
    if os.path.isfile(Path(name) / PEFT_ADAPTER_CONFIG):
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(name).base_model_name_or_path
        parent = PeftModel.from_pretrained(load_complete(auto_class, base_name, kwargs), name)
        return parent.merge_and_unload()
    return load_complete(auto_class, name, kwargs)


def load_complete(auto_class: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """`auto_class.from_pretrained(name)`, refused when the checkpoint lacks weights of the model (transformers would
    initialise them at random with only a log line) or holds them in another shape. Weights tied to others (an LM head
    tied to the input embeddings) are not missing."""
    model, info = auto_class.from_pretrained(name, output_loading_info=True, **kwargs)
    missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
    if missing or mismatched:
        keys = sorted(missing) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in mismatched)
        modules = sorted({key.rsplit(".", 1)[0] if "." in key else key for key in keys})
        raise ValueError(
            f"The parent checkpoint {name!r} does not cover the {type(model).__name__} it is loaded as: no trained "
            f"weights for module(s) {', '.join(modules)} ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}), "
            "which transformers would initialise at random, so the parent could not teach. This happens when a base "
            f"model without the task head (saved from AutoModel) is given as the parent of a {auto_class.__name__} "
            "child. Give a parent trained for the child's task, whose folder holds every weight of that model."
        )
    return model


def default_label_names(labels: dict) -> bool:
    return all(str(name) == f"LABEL_{i}" for i, name in labels.items())


def label_names(config: Any) -> list[str]:
    """`id2label` in id order; keys may be strings (as `run_image_classification.py` builds them) or ints."""
    by_id = {int(k): v for k, v in config.id2label.items()}
    return [by_id[i] for i in sorted(by_id)]


def check_compatible(parent: nn.Module, child: nn.Module) -> None:
    """Refuse a parent that cannot teach this child: the same object, another task, or another label set."""
    if parent is child or base_of(parent) is base_of(child):
        raise ValueError("The parent is the child object itself; load a separate (larger, pretrained) parent model.")
    if task_of(parent) != task_of(child):
        raise ValueError(
            f"Parent ({type(base_of(parent)).__name__}, task {task_of(parent)}) and child "
            f"({type(base_of(child)).__name__}, task {task_of(child)}) solve different tasks; HKT needs both to be "
            "trained for the same task with the same labels."
        )
    pc, cc = getattr(base_of(parent), "config", None), getattr(base_of(child), "config", None)
    if is_classifier(child) and pc is not None and cc is not None:
        if pc.num_labels != cc.num_labels:
            raise ValueError(
                f"Parent has {pc.num_labels} labels, child has {cc.num_labels}; HKT needs the same label set. "
                "Use a parent fine-tuned on the child's task."
            )
        if not (default_label_names(pc.id2label) or default_label_names(cc.id2label)):
            if label_names(pc) != label_names(cc):
                raise ValueError(
                    f"Parent labels {label_names(pc)} differ from child labels {label_names(cc)}; align id2label first."
                )


def check_finite_weights(parent: nn.Module, name: str) -> None:
    """Refuse a parent with NaN/inf weights or buffers (a corrupted file, a diverged run) before training starts;
    parameters partitioned by ZeRO-3 at load time are checked whole."""
    for key, tensor in whole_state(parent):
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise ValueError(
                f"The parent {name} has non-finite values (NaN or inf) in '{key}': it cannot teach. Check the parent "
                "checkpoint (re-download or re-train it)."
            )


# ---- vocabularies: text models read (and LMs predict) token ids, which must mean the same tokens in both ----------


def token_table(model: nn.Module, getter: str) -> nn.Module | None:
    """The model's input or output embedding table (under a PEFT layer's `base_layer`), or None."""
    try:
        module = getattr(base_of(model), getter, lambda: None)()
    except NotImplementedError:  # models without such a table may say so
        return None
    return getattr(module, "base_layer", module)


def reads_tokens(model: nn.Module) -> bool:
    """Whether the model's input is token ids: its input embeddings are an embedding table."""
    return isinstance(token_table(model, "get_input_embeddings"), nn.Embedding)


def tokenizer_of(processing_class: Any) -> Any | None:
    """The tokenizer in a trainer's `processing_class` (itself, or a processor's `.tokenizer`), else None."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer if callable(getattr(tokenizer, "get_vocab", None)) else None


def saved_tokenizer(parent: nn.Module, name: str | None, revision: str | None = None) -> Any | None:
    """The tokenizer saved with the parent: in the folder it was named by or loaded from, or in the Hub repo it was
    loaded from; None when there is none."""
    from transformers import AutoTokenizer

    loaded_from = getattr(getattr(base_of(parent), "config", None), "name_or_path", None)
    for source in dict.fromkeys((name, loaded_from)):
        if not isinstance(source, str) or not source:
            continue
        local = os.path.isdir(source)
        if local and not any(os.path.isfile(Path(source) / f) for f in TOKENIZER_FILES):
            continue
        if not local and source != loaded_from:  # a Hub id the parent object was not loaded from
            continue
        try:
            return AutoTokenizer.from_pretrained(source, **({} if local else {"revision": revision}))
        except (OSError, ValueError):
            continue
    return None


def vocabulary_sizes(model: nn.Module) -> dict[str, int]:
    """The rows of the model's embedding tables and its config's `vocab_size` (ZeRO-3 partitions by their full
    shape)."""
    base, sizes = base_of(model), {}
    for what, getter in (("input embeddings", "get_input_embeddings"), ("output embeddings", "get_output_embeddings")):
        weight = getattr(token_table(model, getter), "weight", None)
        if isinstance(weight, torch.Tensor):
            sizes[what] = int(getattr(weight, "ds_shape", weight.shape)[0])
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "vocab_size", None) is not None:
        sizes["config.vocab_size"] = int(text.vocab_size)
    return sizes


def special_ids(model: nn.Module) -> dict[str, set[int]]:
    """Special token ids named by the model's config and generation config (an `eos_token_id` may be a list)."""
    base = base_of(model)
    config = getattr(base, "config", None)
    sources = (config.get_text_config() if hasattr(config, "get_text_config") else config,
               getattr(base, "generation_config", None))
    ids = {}
    for key in SPECIAL_IDS:
        values = set()
        for source in sources:
            value = getattr(source, key, None)
            values |= set(value) if isinstance(value, (list, tuple)) else ({value} if value is not None else set())
        if values:
            ids[key] = values
    return ids


def compare_tokenizers(parent_tokenizer: Any, child_tokenizer: Any) -> None:
    """Refuse two tokenizers that map any token to another id."""
    theirs, ours = parent_tokenizer.get_vocab(), child_tokenizer.get_vocab()
    if theirs == ours:
        return
    differ = sorted(t for t in theirs.keys() | ours.keys() if theirs.get(t) != ours.get(t))
    examples = "; ".join(f"{t!r}: parent {theirs.get(t)}, child {ours.get(t)}" for t in differ[:3])
    raise ValueError(
        f"The parent's tokenizer ({len(theirs)} tokens, saved with the parent) and the child's ({len(ours)} tokens, "
        f"the trainer's processing_class) differ on {len(differ)} tokens ({examples}): the parent would read and "
        "predict other tokens than the child under the same ids. HKT needs one tokenizer for both: use a parent of "
        "the child's model family, or a child built on the parent's tokenizer."
    )


def check_tables_cover(tokenizer: Any, sizes: dict[str, dict[str, int]]) -> None:
    """Refuse an embedding table or `vocab_size` smaller than the tokenizer: its ids would index past the table."""
    needed = max(tokenizer.get_vocab().values()) + 1
    for role, table in sizes.items():
        for what, rows in table.items():
            if rows < needed:
                raise ValueError(
                    f"The {role}'s {what} has {rows} rows, but the tokenizer has token ids up to {needed - 1}: those "
                    "tokens would index past the table (an IndexError inside its embedding) or have no logit. The "
                    "parent and the child must both be built for this tokenizer."
                )


def check_special_ids(parent: nn.Module, child: nn.Module) -> None:
    """Refuse configs whose special token ids share no id: a sign of two tokenizers when they cannot be compared."""
    theirs, ours = special_ids(parent), special_ids(child)
    clash = [f"{key}: parent {sorted(theirs[key])}, child {sorted(ours[key])}" for key in SPECIAL_IDS
             if key in theirs and key in ours and not theirs[key] & ours[key]]
    if clash:
        raise ValueError(
            f"The parent's and the child's configs give other special token ids ({'; '.join(clash)}): they were built "
            "for different tokenizers. Use a parent with the child's tokenizer. If the two do share one tokenizer, "
            "pass it as the trainer's processing_class and save it in the parent's folder, so that the tokenizers "
            "themselves are compared."
        )


def check_vocabularies(parent: nn.Module, child: nn.Module, processing_class: Any, parent_name: str | None,
                       revision: str | None = None) -> None:
    """For models that read token ids (language models, text and token classifiers...), refuse a parent whose token
    ids mean other tokens than the child's, or that the tokenizer's ids would index past: tokenizers are compared where both can be seen (the trainer's
    `processing_class`, a tokenizer saved with the parent), special token ids otherwise. Embedding tables of other
    sizes are accepted only when a tokenizer fits both (one tokenizer padded differently, e.g. Qwen2.5 0.5B and
    7B); KD then compares the two models on the smaller table's tokens (`shared_vocabulary`)."""
    if not (reads_tokens(parent) and reads_tokens(child)):
        return
    child_tokenizer, parent_tokenizer = tokenizer_of(processing_class), saved_tokenizer(parent, parent_name, revision)
    if child_tokenizer is not None and parent_tokenizer is not None:
        compare_tokenizers(parent_tokenizer, child_tokenizer)
    else:
        check_special_ids(parent, child)
    sizes = {"parent": vocabulary_sizes(parent), "child": vocabulary_sizes(child)}
    tokenizer = child_tokenizer if child_tokenizer is not None else parent_tokenizer
    if tokenizer is not None:
        check_tables_cover(tokenizer, sizes)
    elif len({rows for table in sizes.values() for rows in table.values()}) > 1:
        raise ValueError(
            f"The parent's vocabulary ({sizes['parent']}) and the child's ({sizes['child']}) differ in size, and no "
            "tokenizer can be seen to tell whether they share one. If both use one tokenizer whose tables are padded "
            "to other sizes (e.g. Qwen2.5-0.5B: 151936 rows, Qwen2.5-7B: 152064), pass it to the trainer as "
            "processing_class=tokenizer: it is checked to fit both, and KD compares the models on the shared tokens. "
            "Otherwise the parent reads other tokens than the child: use a parent with the child's tokenizer."
        )


def shared_vocabulary(child_logits: torch.Tensor, parent_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two predictions over the tokens both tables hold: LM logits of one tokenizer padded to tables of other
    sizes (`check_vocabularies` accepted them) keep the smaller table's columns; other predictions are unchanged."""
    if child_logits.shape[:-1] != parent_logits.shape[:-1] or child_logits.shape[-1] == parent_logits.shape[-1]:
        return child_logits, parent_logits
    shared = min(child_logits.shape[-1], parent_logits.shape[-1])
    return child_logits[..., :shared], parent_logits[..., :shared]


@contextmanager
def frozen(parent: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Freeze `parent` in the run's mode for the duration of the block; restore the caller's settings after.

    Cheap (flags only, no tensor is touched); nests (an inner block restores the outer block's settings)."""
    grads = {p: p.requires_grad for p in parent.parameters()}
    modes = {m: m.training for m in parent.modules()}
    parent.requires_grad_(False)
    parent.eval()
    if mode == "train-bn":
        for module in parent.modules():
            if is_batch_norm(module):
                module.train()
    try:
        yield parent
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in modes.items():
            m.training = flag
