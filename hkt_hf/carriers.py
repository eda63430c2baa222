"""Carrier pairs: which parent feature is transferred into which child feature.

A carrier is written `"parent.module.path=child.module.path"` (module outputs; append `:input` to take a
module's first input instead), or `auto`: the inputs of the two classification heads, the reference setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .extraction import FeatureSpec, resolve_module

HEAD_NAMES = ("classifier", "score", "head", "fc", "linear")


@dataclass(frozen=True)
class CarrierPair:
    parent: FeatureSpec
    child: FeatureSpec

    def __str__(self) -> str:
        return f"{self.parent}={self.child}"

    @property
    def name(self) -> str:
        """Short name used in logs: the child side."""
        return str(self.child)


def find_head(model: nn.Module, role: str = "model") -> str:
    """Name of the top-level classification head (`classifier`, `score`, `head`, `fc` or `linear`)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    top = [n for n, _ in model.named_children()]
    raise ValueError(
        f"Cannot find the classification head of the {role} ({type(model).__name__}) for an `auto` carrier: none of "
        f"{list(HEAD_NAMES)} is a submodule (it has {top}). Name the carriers explicitly, e.g. "
        "hkt_carriers=['parent.module.path=child.module.path']."
    )


def resolve_carriers(specs: list[str], parent: nn.Module, child: nn.Module) -> list[CarrierPair]:
    """Parse carrier strings, expand `auto`, and check that every named module exists in its network."""
    if not specs:
        raise ValueError("hkt_carriers is empty: give at least one carrier, or ['auto'] for the head inputs.")
    pairs = []
    for text in specs:
        if text.strip() == "auto":
            pair = CarrierPair(
                FeatureSpec(find_head(parent, "parent"), "input"), FeatureSpec(find_head(child, "child"), "input")
            )
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
