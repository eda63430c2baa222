"""Carrier pairs: which parent feature is transferred into which child feature.

A carrier is written `"parent.module.path=child.module.path"` (module outputs; append `:input` to take a
module's first input instead), with the model's own module names (a PEFT-wrapped model's base-model names work), or
one of two keywords:

- `auto`: the inputs of the two prediction heads, the reference setting. The head is found through transformers'
  APIs: `get_output_embeddings()` for language-model heads (causal, masked, seq2seq), else the classification or
  question-answering head module.
- `blocks`: the outputs of some of the child's repeated blocks, each paired with the parent's block at the same
  relative depth of the same stack (`block_carriers`). Blocks are the elements of a module list whose class
  transformers lists in `_no_split_modules` (decoder layers, encoder layers, residual blocks); a stack is the
  outermost list holding them (an encoder-decoder has two). Not the paper's formula: an option the benchmarks measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .compat import no_split_module_classes
from .extraction import FeatureSpec, resolve_module
from .model_state import base_of
from .tasks import LM_TASKS, loss_task

MAX_BLOCK_CARRIERS = 3
LISTS = (nn.ModuleList, nn.Sequential)  # the containers whose elements can be blocks
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


@dataclass(frozen=True)
class BlockStack:
    """One stack of repeated blocks: the outermost `nn.ModuleList` / `nn.Sequential` that holds them, and the blocks'
    dotted names in depth order."""

    name: str
    blocks: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name} ({len(self.blocks)} blocks)"


def _outermost_list(modules: dict[str, nn.Module], name: str) -> str:
    """The name of the outermost `ModuleList` / `Sequential` above module `name` (one that holds it)."""
    path = name.split(".")
    return next(".".join(path[:k]) for k in range(len(path)) if isinstance(modules[".".join(path[:k])], LISTS))


def block_stacks(model: nn.Module, role: str = "model") -> list[BlockStack]:
    """The model's stacks of repeated blocks (in the base model, under any PEFT wrapper), in model order.

    A block is an instance of a class transformers lists in `_no_split_modules` (a decoder layer, a residual block)
    that is an element of an `nn.ModuleList` / `nn.Sequential`, outermost only: embeddings or a shortcut branch listed
    there too are never blocks, even in a 1-layer model. Its stack is the outermost such list above it: a transformer's
    layer list (an encoder-decoder has two, its encoder's and its decoder's), a CNN's stage or list of stages."""
    base = base_of(model)
    classes = no_split_module_classes(base)
    if not classes:
        raise ValueError(
            f"The {role} ({type(base).__name__}) lists no block classes in `_no_split_modules`, so `blocks` carriers "
            "cannot find its blocks. Name the carriers explicitly, e.g. hkt_carriers=['model.layers.5=model.layers.1']."
        )
    modules = dict(base.named_modules())
    blocks: list[str] = []
    for name, module in modules.items():  # parents before children: an outer block comes before its inner ones
        if (type(module).__name__ in classes and isinstance(modules.get(name.rpartition(".")[0]), LISTS)
                and not any(name.startswith(outer + ".") for outer in blocks)):
            blocks.append(name)
    if not blocks:
        raise ValueError(
            f"The {role} ({type(base).__name__}) holds no `_no_split_modules` class ({sorted(classes)}) in a ModuleList "
            "or Sequential, so `blocks` carriers find no repeated blocks. Name the carriers explicitly."
        )
    stacks: dict[str, list[str]] = {}
    for name in blocks:
        stacks.setdefault(_outermost_list(modules, name), []).append(name)
    return [BlockStack(name, tuple(names)) for name, names in stacks.items()]


def _stack_sides(model: nn.Module, stacks: list[BlockStack]) -> list[str] | None:
    """For an encoder-decoder model, which side each stack is on (as `objective.on_decoder` decides); else None."""
    if not getattr(getattr(base_of(model), "config", None), "is_encoder_decoder", False):
        return None
    return ["encoder" if "encoder" in stack.name.split(".") else "decoder" for stack in stacks]


def _corresponding_stacks(parent: nn.Module, child: nn.Module) -> list[tuple[BlockStack, BlockStack]]:
    """The parent's and the child's stacks paired in order, refused where they do not correspond one to one (another
    count, or an encoder stack facing a decoder stack)."""
    parents, children = block_stacks(parent, "parent"), block_stacks(child, "child")
    sides = _stack_sides(parent, parents), _stack_sides(child, children)
    if len(parents) != len(children) or (None not in sides and sides[0] != sides[1]):
        raise ValueError(
            f"`blocks` pairs each block stack of the child with the parent's stack in the same place, but the child has "
            f"{[str(s) for s in children]} and the parent {[str(s) for s in parents]}: no stack-by-stack pairing exists. "
            f"Name the carriers explicitly, e.g. hkt_carriers=['{parents[-1].blocks[-1]}={children[-1].blocks[-1]}']."
        )
    return list(zip(parents, children))


def block_carriers(parent: nn.Module, child: nn.Module, most: int = MAX_BLOCK_CARRIERS) -> list[CarrierPair]:
    """The `blocks` carriers, within each pair of corresponding stacks: `max(1, most // stacks)` child blocks evenly
    spaced and ending with the stack's last, each with the first parent block of the same stack at least as deep
    (child block i of c takes parent block ceil((i + 1) * p / c) - 1 of p: the last with the last, never out of depth
    order, a child deeper than its parent reusing parent blocks)."""
    stack_pairs = _corresponding_stacks(parent, child)
    per_stack = max(1, most // len(stack_pairs))
    pairs = []
    for parents, children in stack_pairs:
        p, c = len(parents.blocks), len(children.blocks)
        count = min(c, per_stack)
        for j in range(count):
            i = (j + 1) * c // count - 1
            pairs.append(CarrierPair(FeatureSpec(parents.blocks[-(-(i + 1) * p // c) - 1]),
                                     FeatureSpec(children.blocks[i])))
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
