"""Import reference-format CIFAR ResNet checkpoints (`*.th`, `*.pth`) into `save_pretrained` folders.

The reference files are pickles; they are read with `torch.load(weights_only=True)`, which refuses to run
arbitrary pickled code. Only an explicit `allow_pickle=True` falls back to full unpickling.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .. import cifar_image_processor
from .configuration_cifar_resnet import CifarResNetConfig
from .modeling_cifar_resnet import CifarResNetForImageClassification

_BLOCK_KEY = re.compile(r"^layer(\d)\.(\d+)\.")


def load_reference_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the `state_dict` of a reference checkpoint, stripping the `module.` prefix of DataParallel."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # torch raises several types for truncated, corrupt or unsafe files
        hint = (
            "" if allow_pickle else " If you trust its origin and it holds Python objects, pass allow_pickle=True."
        )
        raise ValueError(f"Could not read checkpoint {path}: {type(err).__name__}: {err}.{hint}") from err
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is not a reference CIFAR ResNet checkpoint: expected a dict of tensors or a dict with a "
            "'state_dict' entry."
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def infer_depth(state: dict[str, torch.Tensor]) -> int:
    """Depth 6n+2 from the number of BasicBlocks per stage found in the keys."""
    blocks = {(int(m.group(1)), int(m.group(2))) for k in state if (m := _BLOCK_KEY.match(k))}
    per_stage = {s: sum(1 for st, _ in blocks if st == s) for s in (1, 2, 3)}
    if not blocks or len(set(per_stage.values())) != 1:
        raise ValueError(f"Cannot infer a CIFAR ResNet depth: blocks per stage are {per_stage}.")
    return 6 * per_stage[1] + 2


def convert_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys to this package's names: backbone under `resnet.`, head `linear` -> `classifier`."""
    out = {}
    for key, value in state.items():
        out[key.replace("linear.", "classifier.", 1) if key.startswith("linear.") else f"resnet.{key}"] = value
    return out


def import_checkpoint(
    src: str | os.PathLike, out_dir: str | os.PathLike | None = None, allow_pickle: bool = False
) -> CifarResNetForImageClassification:
    """Build a `CifarResNetForImageClassification` from a reference checkpoint; save it to `out_dir` if given."""
    state = load_reference_state_dict(src, allow_pickle=allow_pickle)
    depth = infer_depth(state)
    num_labels = state["linear.weight"].shape[0] if "linear.weight" in state else 10
    config = CifarResNetConfig(depth=depth, hidden_sizes=[state[f"layer{i}.0.conv1.weight"].shape[0] for i in (1, 2, 3)])
    if num_labels != config.num_labels:
        config.num_labels = num_labels
    model = CifarResNetForImageClassification(config)
    converted = convert_reference_state_dict(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{src} does not match a depth-{depth} CIFAR ResNet: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{src}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}.")
    model.load_state_dict(converted, strict=False)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        cifar_image_processor().save_pretrained(out_dir)
    return model
