"""Crash-safe checkpoints: a checkpoint counts only once a completion marker lists the files its save wrote.

The Trainer writes `checkpoint-N/` file by file, each process its own part; a run killed mid-save leaves a folder that
looks like a checkpoint but is not one. So:

- every save into a folder starts by removing its marker (`begin_save`): a second run saving into `checkpoint-N`
  of the same `output_dir` never leaves the first run's marker beside its own half-written files;
- `CheckpointCommitCallback` waits until every process has written its part, then writes the marker atomically: a
  manifest of the folder's files (name, size, sha256 of samples of the content), refused if a file every complete
  checkpoint holds is missing (one `rng_state_N.pth` per process, the lineage, the adapter's state);
- `prepare_resume` resumes only from a marked checkpoint whose files are still those of its manifest, written by a
  run with the same objective and parent (`lineage.resume_lineage`), and tells a plain `Trainer` checkpoint apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .adapter import ADAPTER_WEIGHTS_NAME
from .lineage import FRESH_START, FROM_WEIGHTS, HKT_CONFIG_NAME, resume_lineage

logger = logging.get_logger(__name__)

COMPLETE_MARKER = "hkt_checkpoint_complete"
MANIFEST_VERSION = 1
_LEGACY_MARKER = "complete"  # hkt-hf before manifests: a marker that lists nothing
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Files up to _WHOLE bytes are hashed whole; larger ones (multi-GB weights, optimizer states) by _BLOCKS evenly spaced
# blocks of _BLOCK bytes, first and last included: cheap, and any rewrite of trained weights changes it.
_WHOLE, _BLOCK, _BLOCKS = 4 << 20, 64 << 10, 16


def required_files(world_size: int, save_only_model: bool) -> list[str]:
    """What every complete HKT checkpoint holds: the lineage, the adapter's state (an empty file for an adapter
    without parameters), the Trainer's state and, unless `save_only_model`, one RNG state per process."""
    names = [HKT_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, TRAINER_STATE_NAME]
    if not save_only_model:
        names += ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    return names


def _sampled_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE:
            digest.update(f.read())
        else:
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _listed_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The folder's regular files (recursively: DeepSpeed and FSDP write sub-folders), marker and temporaries aside."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name == COMPLETE_MARKER or name.endswith(".tmp") or not path.is_file():
            continue
        size = path.stat().st_size
        files[name] = {"size": size, "sha256_sampled": _sampled_sha256(path, size)}
    return files


def begin_save(folder: str | os.PathLike, adapter_attached: bool) -> None:
    """Before anything is saved into `folder`: drop its completion marker (the folder no longer holds what the
    marker lists) and, for a save of the plain child (no adapter attached), an adapter state left by a save made
    while training, which a push of the folder would upload."""
    folder = Path(folder)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    if not adapter_attached:
        (folder / ADAPTER_WEIGHTS_NAME).unlink(missing_ok=True)


def mark_complete(checkpoint_dir: str | os.PathLike, world_size: int = 1, save_only_model: bool = False) -> bool:
    """Write the marker (the manifest of the folder's files) atomically, once every file is written. Returns False,
    writing nothing, when a file every complete checkpoint holds is missing (a process died before its part)."""
    folder = Path(checkpoint_dir)
    files = _listed_files(folder)
    missing = [name for name in required_files(world_size, save_only_model) if name not in files]
    if missing:
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        logger.error(f"{folder} is not marked complete: it lacks {', '.join(missing)}. It cannot be resumed.")
        return False
    manifest = {"manifest_version": MANIFEST_VERSION, "world_size": world_size, "save_only_model": save_only_model,
                "files": files}
    path = folder / COMPLETE_MARKER
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` that carry a completion marker, by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and is_complete(p)]
    return [path for _, path in sorted(steps)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step `checkpoint-N` folder in `output_dir` that carries the completion marker."""
    found = complete_checkpoints(output_dir)
    return str(found[-1]) if found else None


def _step(checkpoint: Path) -> int | None:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else None


def _earlier_advice(checkpoint: Path) -> str:
    step = _step(checkpoint)
    earlier = [p for p in complete_checkpoints(checkpoint.parent) if p != checkpoint and (_step(p) or 0) < (step or 0)]
    return (f"Resume from an earlier checkpoint of the same run: {earlier[-1]}." if earlier
            else "Resume from an earlier checkpoint of the same run, or " + FRESH_START.format(checkpoint=checkpoint))


def is_plain_trainer_checkpoint(folder: str | os.PathLike) -> bool:
    """A folder the plain `Trainer` saved completely (its state file is there) with none of HKT's files."""
    folder = Path(folder)
    return (folder / TRAINER_STATE_NAME).is_file() and not any(
        (folder / name).exists() for name in (HKT_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, COMPLETE_MARKER)
    )


def plain_trainer_diagnosis(folder: str | os.PathLike) -> str:
    return (
        f"{folder} is a checkpoint of the plain Trainer (no {HKT_CONFIG_NAME} / {ADAPTER_WEIGHTS_NAME}): HKTTrainer "
        "cannot resume it (its optimizer holds no state for the aligners and gates, and no HKT settings were "
        "recorded). To start HKT from its weights, " + FROM_WEIGHTS.format(checkpoint=folder)
    )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The marker's manifest; None for a marker of an earlier hkt-hf, which lists nothing."""
    marker = folder / COMPLETE_MARKER
    try:
        text = marker.read_text()
        if text.strip() == _LEGACY_MARKER:
            return None
        manifest = json.loads(text)
        files = manifest["files"]
        if not isinstance(manifest["world_size"], int) or not all(isinstance(e, dict) for e in files.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"Cannot resume from {folder}: its completion marker {marker} is damaged. " + _earlier_advice(folder)
        ) from None
    return manifest


def _file_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why `path` is not the file the manifest lists, or None. Never opens what is not a regular file (a FIFO or a
    device would block or never end)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "is a dangling symlink" if path.is_symlink() else "is missing"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file (a directory, a device, a FIFO, or a symlink to one)"
    if info.st_size != entry.get("size"):
        return (f"has {info.st_size} bytes, {entry.get('size')} when its save completed: the file is truncated or "
                "corrupt")
    try:
        digest = _sampled_sha256(path, info.st_size)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if digest != entry.get("sha256_sampled"):
        return ("has changed since its save completed: the file is corrupt, or was overwritten (e.g. by another run "
                "saving into the same folder)")
    return None


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Refuse (ValueError naming the file) a marked checkpoint whose files are not those its manifest lists, or whose
    manifest lacks a file every complete checkpoint holds (e.g. the RNG state of one of its processes)."""
    folder = Path(checkpoint)
    manifest = _read_manifest(folder)
    if manifest is None:
        logger.warning(f"{folder} was marked complete by an earlier hkt-hf, without a manifest: its files cannot be "
                       "checked.")
        return
    files = manifest["files"]
    for name in required_files(manifest["world_size"], bool(manifest.get("save_only_model"))):
        if name not in files:
            raise ValueError(
                f"Cannot resume from {folder}: its save by {manifest['world_size']} process(es) did not complete "
                f"({folder / name} was never written). " + _earlier_advice(folder)
            )
    for name, entry in files.items():
        problem = _file_problem(folder / name, entry)
        if problem is not None:
            kind = "weights" if name.endswith((".safetensors", ".bin")) else "file"
            raise ValueError(f"Cannot read checkpoint {kind} {folder / name}: it {problem}. " + _earlier_advice(folder))


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """Turn `resume_from_checkpoint` into the path of a complete, intact checkpoint, or fail clearly."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = complete_checkpoints(output_dir)
        if not found:
            folders = sorted(Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: _step(p) or -1)
            plain = [p for p in folders if is_plain_trainer_checkpoint(p)]
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} holds no complete HKT checkpoint."
                + (f" {plain_trainer_diagnosis(plain[-1])}" if plain else "")
            )
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise ValueError(f"resume_from_checkpoint={resume!r} is not a folder.")
        if is_plain_trainer_checkpoint(checkpoint):
            raise ValueError(plain_trainer_diagnosis(checkpoint))
        if not is_complete(checkpoint):
            last = last_complete_checkpoint(checkpoint.parent)
            lacking = [str(checkpoint / name) for name in required_files(1, True) if not (checkpoint / name).is_file()]
            raise ValueError(
                f"{resume} is not a complete checkpoint (no '{COMPLETE_MARKER}' marker: its save was interrupted"
                + (f"; it lacks {', '.join(lacking)}). " if lacking else "). ")
                + (f"Resume from {last} instead." if last else "No complete checkpoint exists beside it.")
            )
    verify_checkpoint(checkpoint)
    return str(checkpoint)


def prepare_resume(
    resume: str | bool | None, output_dir: str, lineage: dict[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint to resume from (None: no resume) and this run's lineage record for it; refuses, before any
    step, a checkpoint that is incomplete, damaged, not HKT's, or written for another objective or parent."""
    checkpoint = resolve_resume_checkpoint(resume, output_dir)
    if checkpoint is None:
        return None, lineage
    return checkpoint, resume_lineage(checkpoint, lineage, _step(Path(checkpoint)))


class CheckpointCommitCallback(TrainerCallback):
    """Marks `checkpoint-N` complete once every process has written its part of it."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        PartialState().wait_for_everyone()  # each process saves its own RNG state (and shards) without waiting
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder, args.world_size, args.save_only_model)
