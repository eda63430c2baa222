"""Extraction (the E of ETM): forward hooks that capture, and optionally replace, features of named modules.

Hooks exist only inside a `with FeatureExtractor(...)` block, so nothing is left on a model after a step, an
exception or Ctrl-C, and captured tensors never outlive the step that produced them. A carrier is one feature per
pass: a module that runs several times in one pass (a shared layer) is refused when the block ends, since mixing
would replace one of its calls with another's feature.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .model_state import base_of

INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class FeatureSpec:
    """Where a feature lives: the output (default) or the first positional input of a module, by dotted name."""

    module: str
    where: str = "output"

    @classmethod
    def parse(cls, text: str) -> "FeatureSpec":
        text = text.strip()
        if text.endswith(INPUT_SUFFIX):
            return cls(text[: -len(INPUT_SUFFIX)], "input")
        return cls(text, "output")

    def __str__(self) -> str:
        return self.module + (INPUT_SUFFIX if self.where == "input" else "")


def resolve_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """`model.get_submodule(name)`, also by the base model's names under a PEFT wrapper; the error lists the
    closest existing names."""
    for root in dict.fromkeys((model, base_of(model))):  # the wrapper's own names, then the base model's
        try:
            return root.get_submodule(name) if name else root
        except AttributeError:
            pass
    base = base_of(model)
    names = [n for n, _ in base.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else f" Top-level modules: {', '.join(n for n in names if '.' not in n)}."
    raise ValueError(f"The {role} ({type(base).__name__}) has no module named '{name}'.{hint}")


def first_tensor(value: Any, what: str = "a module output") -> torch.Tensor:
    """The feature tensor of a module output: the tensor itself, or the first element of a tuple/ModelOutput.
    `what` names the carrier in the error."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(
        f"Cannot take a feature tensor from {what}: it is of type {type(value).__name__}. Pick a carrier module whose "
        "output (or, with ':input', first input) is a tensor, a tuple starting with one, or a ModelOutput."
    )


def with_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """`value` with its feature tensor (see `first_tensor`) swapped for `tensor`."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, dict):
        out = value.__class__(value)
        out[next(iter(value))] = tensor
        return out
    return type(value)((tensor, *value[1:]))


Replacement = Callable[[int, torch.Tensor], torch.Tensor]


class CarrierError(ValueError):
    """A carrier module that cannot carry a feature: it runs several times in one pass, or its output has no gradient
    path while trainable parameters run before it."""


class FeatureExtractor:
    """Captures features `specs` of `model` during the one forward pass run inside the `with` block.

    `replace(i, feature)`, if given, returns the tensor that the forward continues with in place of feature i. With
    `grad_after_replace`, autograd is switched on from the first replacement to the end of the block: run the
    forward under `torch.no_grad()` and only the part downstream of the replaced feature records a graph.
    With `check_grad_path` (a training pass, entered with autograd on), a carrier feature that does not require grad
    while trainable parameters of `model` ran before it is refused (`_refuse_without_grad_path`).
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[FeatureSpec],
        replace: Replacement | None = None,
        grad_after_replace: bool = False,
        role: str = "model",
        check_grad_path: bool = False,
    ):
        self.model = model
        self.modules = [resolve_module(model, spec.module, role) for spec in specs]
        self.specs = list(specs)
        self.role = role
        self.replace = replace
        self.grad_after_replace = grad_after_replace
        self.check_grad_path = check_grad_path
        self.features: dict[int, torch.Tensor] = {}
        self.calls: dict[int, int] = {}
        self._ran: list[tuple[str, nn.Module]] = []  # trainable modules in the order they started, if checked
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_mode = torch.is_grad_enabled()

    def _swap(self, index: int, feature: torch.Tensor) -> torch.Tensor | None:
        self.calls[index] = self.calls.get(index, 0) + 1
        if self.calls[index] > 1:  # a shared module's later call: left alone, refused when the block ends
            return None
        self.features[index] = feature
        if self.check_grad_path and self._grad_mode and not feature.requires_grad:
            self._refuse_without_grad_path(index)
        if self.replace is None:
            return None
        if self.grad_after_replace:
            torch.set_grad_enabled(True)
        return self.replace(index, feature)

    def _describe(self, index: int) -> str:
        spec = self.specs[index]
        return f"the {spec.where} of the {self.role}'s carrier module '{spec.module}' (carrier '{spec}')"

    def _hook(self, index: int, where: str) -> Callable:
        if where == "input":

            def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
                new = self._swap(index, first_tensor(args, self._describe(index)))
                return None if new is None else with_first_tensor(args, new)

            return pre_hook

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            new = self._swap(index, first_tensor(output, self._describe(index)))
            return None if new is None else with_first_tensor(output, new)

        return hook

    def _refuse_without_grad_path(self, index: int) -> None:
        """Raise if trainable modules ran before carrier `index` (its ancestors excepted: their own parameters may
        run after it; for an `:input` carrier, the module itself too): the HKT terms would never reach them."""
        spec, module = self.specs[index], self.modules[index]
        ancestors = {m for m in self.model.modules() if any(sub is module for sub in m.modules())}
        if spec.where == "output":
            ancestors.discard(module)
        upstream = [name for name, m in self._ran if m not in ancestors]
        if upstream:
            shown = ", ".join(upstream[:5]) + (f" and {len(upstream) - 5} more" if len(upstream) > 5 else "")
            raise CarrierError(
                f"{self._describe(index).capitalize()} does not require grad (computed under torch.no_grad(), "
                f"detached, or inside reentrant activation checkpointing), while trainable modules run before it "
                f"({shown}): the HKT terms at this carrier would never train them. Pick a carrier module whose output "
                "requires grad, or freeze those modules (requires_grad_(False)) if they are meant to stay fixed."
            )

    def _track_trainable(self) -> None:
        """Record, in order, the modules of `model` that hold trainable parameters of their own as they start."""
        for name, module in self.model.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                def started(m: nn.Module, args: tuple, name: str = name) -> None:
                    self._ran.append((name or type(m).__name__, m))

                self._handles.append(module.register_forward_pre_hook(started))

    def _reused(self) -> str | None:
        """The carriers whose module ran more than once in the block, with how many times, or None."""
        reused = [f"'{self.specs[i].module}' ran {n} times" for i, n in self.calls.items() if n > 1]
        if not reused:
            return None
        return (
            f"The {self.role}'s carrier module {', '.join(reused)} in one forward pass: it is a shared module (e.g. "
            "ALBERT's shared layer, or a layer called twice), so one carrier would stand for several features and "
            "mixing would replace one call's feature with another's. Pick a module that runs once per forward, e.g. "
            "one that encloses the shared module, or 'auto' (the inputs of the prediction heads)."
        )

    def __enter__(self) -> "FeatureExtractor":
        self._grad_mode = torch.is_grad_enabled()
        self.features, self.calls, self._ran = {}, {}, []
        if self.check_grad_path and self._grad_mode:
            self._track_trainable()
        # prepend: run before hooks the model keeps (e.g. transformers' OutputRecorder, which feeds SegFormer's
        # decoder its stage outputs), so that they see the replaced feature.
        for i, (spec, module) in enumerate(zip(self.specs, self.modules)):
            if spec.where == "input":
                self._handles.append(module.register_forward_pre_hook(self._hook(i, "input"), prepend=True))
            else:
                self._handles.append(module.register_forward_hook(self._hook(i, "output"), prepend=True))
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._ran = []
        torch.set_grad_enabled(self._grad_mode)
        reused = self._reused()
        if reused and exc_type is None:
            raise CarrierError(reused)
