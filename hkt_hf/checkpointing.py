"""Crash-safe checkpoints: a checkpoint counts only once a completion marker is written after all its files.

The Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a folder that looks like a checkpoint
but is not one. `CheckpointCommitCallback` writes the marker (atomically) after the Trainer has saved everything,
and `resolve_resume_checkpoint` resumes only from marked checkpoints.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

COMPLETE_MARKER = "hkt_checkpoint_complete"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def mark_complete(checkpoint_dir: str | os.PathLike) -> None:
    path = Path(checkpoint_dir) / COMPLETE_MARKER
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(checkpoint_dir: str | os.PathLike) -> bool:
    return (Path(checkpoint_dir) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step `checkpoint-N` folder in `output_dir` that carries the completion marker."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and is_complete(p)]
    return str(max(steps)[1]) if steps else None


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """Turn `resume_from_checkpoint` into the path of a complete checkpoint, or fail clearly."""
    if resume is None or resume is False:
        return None
    if resume is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"resume_from_checkpoint=True but {output_dir} holds no complete HKT checkpoint.")
        return found
    if not Path(resume).is_dir():
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a folder.")
    if not is_complete(resume):
        last = last_complete_checkpoint(Path(resume).parent)
        raise ValueError(
            f"{resume} is not a complete checkpoint (no '{COMPLETE_MARKER}' marker: its save was interrupted). "
            + (f"Resume from {last} instead." if last else "No complete checkpoint exists beside it.")
        )
    return str(resume)


class CheckpointCommitCallback(TrainerCallback):
    """Marks `checkpoint-N` complete once the Trainer has written all of it."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder)
