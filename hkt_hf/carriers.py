"""Carrier pairs: which parent feature is transferred into which child feature.

A carrier is written `"parent.module.path=child.module.path"` (module outputs; append `:input` to take a
module's first input instead), with the model's own module names (a PEFT-wrapped model's base-model names work), or
`auto`: the inputs of the two prediction heads, the reference setting. The head is found through transformers'
APIs: `get_output_embeddings()` for language-model heads (causal, masked, seq2seq), else the classification or
question-answering head module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .extraction import FeatureSpec, base_of, resolve_module
from .tasks import task_of

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
    """Dotted name (in the base model, under any PEFT wrapper) of the module that produces the prediction."""
    base = base_of(model)
    task = task_of(base)
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


def resolve_carriers(specs: list[str], parent: nn.Module, child: nn.Module) -> list[CarrierPair]:
    """Parse carrier strings, expand `auto`, and check that every named module exists in its network."""
    if not specs:
        raise ValueError("hkt_carriers is empty: give at least one carrier, or ['auto'] for the head inputs.")
    pairs = []
    for text in specs:
        if text.strip() == "auto":
            pair = head_carrier(parent, child)
        else:
            pair = parse_carrier(text)
            resolve_module(parent, pair.parent.module, "parent")
            resolve_module(child, pair.child.module, "child")
        if pair in pairs:
            raise ValueError(f"Carrier '{pair}' is given twice in hkt_carriers.")
        pairs.append(pair)
    return pairs


def parse_carrier(text: str) -> CarrierPair:
    """`"parent.path=child.path"` (each side optionally ending in `:input`) as a `CarrierPair`."""
    sides = text.split("=")
    if len(sides) != 2 or not all(s.strip() for s in sides):
        raise ValueError(
            f"Carrier '{text}' is not of the form 'parent.module.path=child.module.path' (or 'auto'), e.g. "
            "'resnet.layer3=resnet.layer3' or 'classifier:input=classifier:input'."
        )
    return CarrierPair(FeatureSpec.parse(sides[0]), FeatureSpec.parse(sides[1]))
