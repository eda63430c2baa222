"""Carrier pairs: which parent feature is transferred into which child feature.

A carrier is written `"parent.module.path=child.module.path"` (module outputs; append `:input` to take a
module's first input instead), with the model's own module names (a PEFT-wrapped model's base-model names work), or
one of two keywords:

- `auto`: the inputs of the two prediction heads, the reference setting. The head is found through transformers'
  APIs: `get_output_embeddings()` for language-model heads (causal, masked, seq2seq), else the classification or
  question-answering head module.
- `blocks`: the outputs of up to `MAX_BLOCK_CARRIERS` of the child's blocks, evenly spaced and ending with its last,
  each paired with the parent's block at the same relative depth. Blocks are the modules of the class that
  transformers lists in `_no_split_modules` (decoder layers, encoder layers, residual blocks) and that the model
  repeats most, in their order in the model. Not the paper's formula: an option the benchmarks measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .extraction import FeatureSpec, base_of, resolve_module
from .tasks import loss_task

MAX_BLOCK_CARRIERS = 3
LM_TASKS = frozenset({"text-generation", "text2text-generation", "fill-mask"})
HEAD_NAMES = ("classifier", "score", "qa_outputs", "head", "fc", "linear")


@dataclass(frozen=True)
class CarrierPair:
    parent: FeatureSpec
    child: FeatureSpec

    def __str__(self) -> str:
        return f"{self.parent}={self.child}"


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _lm_head(model: nn.Module) -> str | None:
    """Name of the module that turns hidden states into vocabulary logits, from `get_output_embeddings()`."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return _module_name(model, head) if isinstance(head, nn.Module) else None


def find_head(model: nn.Module, role: str = "model") -> str:
    """Dotted name (in the base model, under any PEFT wrapper) of the module that produces the prediction: the output
    embeddings of language models, sequence-to-sequence speech models (Whisper's `proj_out`) included."""
    base = base_of(model)
    task = loss_task(base)
    if task in LM_TASKS:
        name = _lm_head(base)
    else:
        name = next((n for n in HEAD_NAMES if isinstance(getattr(base, n, None), nn.Module)), None)
    if name is not None:
        return name
    top = [n for n, _ in base.named_children()]
    looked_for = "its output embeddings (get_output_embeddings())" if task in LM_TASKS else f"any of {list(HEAD_NAMES)}"
    raise ValueError(
        f"Cannot find the prediction head of the {role} ({type(base).__name__}, task {task or 'unknown'}) for an "
        f"`auto` carrier: looked for {looked_for}; its top-level modules are {top}. Name the carriers explicitly, "
        "e.g. hkt_carriers=['parent.module.path=child.module.path']."
    )


def head_carrier(parent: nn.Module, child: nn.Module) -> CarrierPair:
    """The `auto` carrier: the inputs of the parent's and the child's prediction heads."""
    return CarrierPair(FeatureSpec(find_head(parent, "parent"), "input"), FeatureSpec(find_head(child, "child"), "input"))


def block_names(model: nn.Module, role: str = "model") -> list[str]:
    """Dotted names (in the base model) of the model's repeated blocks, in order: the instances of the class in
    `_no_split_modules` that it holds most of (a ViT lists its embeddings there too, once), outermost only."""
    base = base_of(model)
    classes = set(getattr(base, "_no_split_modules", None) or ())
    found: dict[str, list[str]] = {}
    for name, module in base.named_modules():
        if type(module).__name__ in classes:
            found.setdefault(type(module).__name__, []).append(name)
    if not found:
        raise ValueError(
            f"The {role} ({type(base).__name__}) lists no block classes in `_no_split_modules`, so `blocks` carriers "
            "cannot find its blocks. Name the carriers explicitly, e.g. hkt_carriers=['model.layers.5=model.layers.1']."
        )
    names = max(found.values(), key=len)
    return [n for n in names if not any(n.startswith(outer + ".") for outer in names)]


def block_carriers(parent: nn.Module, child: nn.Module, most: int = MAX_BLOCK_CARRIERS) -> list[CarrierPair]:
    """The `blocks` carriers: child blocks at evenly spaced depths ending with the last, each with the parent block
    at the same relative depth (child block i of c takes parent block (i + 1) * p // c - 1 of p)."""
    parents, children = block_names(parent, "parent"), block_names(child, "child")
    count = min(len(children), most)
    pairs = []
    for j in range(count):
        i = (j + 1) * len(children) // count - 1
        pairs.append(CarrierPair(FeatureSpec(parents[(i + 1) * len(parents) // len(children) - 1]),
                                 FeatureSpec(children[i])))
    return pairs


def resolve_carriers(specs: list[str], parent: nn.Module, child: nn.Module) -> list[CarrierPair]:
    """Parse carrier strings, expand `auto` and `blocks`, and check that every named module exists in its network."""
    if not specs:
        raise ValueError("hkt_carriers is empty: give at least one carrier, or ['auto'] for the head inputs.")
    pairs = []
    for text in specs:
        if text.strip() == "auto":
            expanded = [head_carrier(parent, child)]
        elif text.strip() == "blocks":
            expanded = block_carriers(parent, child)
        else:
            pair = parse_carrier(text)
            resolve_module(parent, pair.parent.module, "parent")
            resolve_module(child, pair.child.module, "child")
            expanded = [pair]
        for pair in expanded:
            if pair in pairs:
                raise ValueError(f"Carrier '{pair}' is given twice in hkt_carriers.")
            pairs.append(pair)
    return pairs


def parse_carrier(text: str) -> CarrierPair:
    """`"parent.path=child.path"` (each side optionally ending in `:input`) as a `CarrierPair`."""
    sides = text.split("=")
    if len(sides) != 2 or not all(s.strip() for s in sides):
        raise ValueError(
            f"Carrier '{text}' is not of the form 'parent.module.path=child.module.path' (or 'auto' or 'blocks'), e.g. "
            "'resnet.layer3=resnet.layer3' or 'classifier:input=classifier:input'."
        )
    return CarrierPair(FeatureSpec.parse(sides[0]), FeatureSpec.parse(sides[1]))
