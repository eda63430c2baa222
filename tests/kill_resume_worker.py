"""A tiny, deterministic HKT run that `tests/test_reliability.py` kills with SIGKILL and resumes.

Usage: python tests/kill_resume_worker.py OUTPUT_DIR [--kill-on-save STEP] [--resume]

Tiny ViTs of different widths with the learned gate, so the adapter (aligners T, T' and the gate's projections and
lambda) has trainable state that an exact resume must restore. With `--kill-on-save STEP` the process kills itself
with SIGKILL inside the Trainer's `on_save` for `checkpoint-STEP`: every file of that checkpoint is written but its
completion marker is not (the marker callback runs after user callbacks), i.e. a save cut short. Without a kill,
the final child and adapter weights are written to `OUTPUT_DIR/final/`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import image_dataset, tiny_vit, training_args  # noqa: E402

from hkt_hf import HKTTrainer  # noqa: E402

MAX_STEPS = 12
SAVE_STEPS = 4
BATCH = 4
FINAL = "final"


class KillOnSave(TrainerCallback):
    """SIGKILLs this process right after the Trainer has saved `checkpoint-<step>` (before it is marked complete)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(output_dir: str | Path, callbacks: list[TrainerCallback] | None = None) -> HKTTrainer:
    """The same run every time: fixed seeds, one thread, no data-loader workers, two epochs of a 24-row dataset."""
    torch.set_num_threads(1)
    parent, child = tiny_vit(16, seed=1), tiny_vit(8, seed=2)
    args = training_args(
        output_dir, hkt_gate="learned", max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        per_device_train_batch_size=BATCH, learning_rate=5e-3, logging_steps=SAVE_STEPS,
    )
    return HKTTrainer(child, args, train_dataset=image_dataset(24), parent_model=parent, callbacks=callbacks)


def run(output_dir: str | Path, kill_on_save: int | None = None, resume: bool = False) -> Path:
    """Train (optionally resuming from the last complete checkpoint) and write the final weights; returns their folder."""
    callbacks = [KillOnSave(kill_on_save)] if kill_on_save is not None else None
    trainer = build_trainer(output_dir, callbacks)
    trainer.train(resume_from_checkpoint=True if resume else None)
    final = Path(output_dir) / FINAL
    trainer.save_model(str(final))
    save_file({k: v.contiguous() for k, v in trainer.hkt_adapter.state_dict().items()}, str(final / "adapter.safetensors"))
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--kill-on-save", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args()
    run(ns.output_dir, ns.kill_on_save, ns.resume)


if __name__ == "__main__":
    main()
