"""A tiny HKT run launched by `tests/test_distributed.py`, alone (`python`) or under `torchrun --nproc_per_node 2`.

Usage: python tests/dist_worker.py OUT.json [--per-device-batch N] [--bf16]

It trains tiny ViTs (no batch-norm, no dropout, so 1 and 2 processes see exactly the same global batches and the
same maths) for a few steps under each HKT setting in `SETTINGS`, and rank 0 writes, per setting, the logged loss
trajectory, the learned-gate lambda, and the largest difference of any child or adapter parameter across ranks
after training (0 means DDP kept every rank in sync).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import image_dataset, tiny_vit, training_args  # noqa: E402

from hkt_hf import HKTTrainer  # noqa: E402

# Parent and child widths differ, so every carrier needs trainable aligners T and T'; the learned gate adds
# trainable projections and lambda. None of these parameters is used by the child's own forward pass.
SETTINGS: dict[str, dict] = {
    # Head replay: aligners on the head inputs and a learned gate, all used outside the child's own forward.
    "auto-learned": dict(hkt_carriers=["auto"], hkt_gate="learned"),
    # Truncated passes through two carriers (token maps), learned gates and the KD term's extra parent pass.
    "two-carriers-learned-kd": dict(
        hkt_carriers=["vit.embeddings=vit.embeddings", "vit.layers.0=vit.layers.0"], hkt_gate="learned",
        hkt_kd_weight=0.5,
    ),
}
GLOBAL_BATCH = 8
STEPS = 4


def max_rank_difference(module: torch.nn.Module) -> float:
    """Largest |difference| of any parameter between this rank and rank 0 (0.0 without a process group)."""
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def run(name: str, hkt: dict, per_device_batch: int, output_dir: str, bf16: bool) -> dict:
    parent, child = tiny_vit(32, layers=2, seed=1), tiny_vit(16, layers=2, seed=2)
    args = training_args(
        output_dir, per_device_train_batch_size=per_device_batch, max_steps=STEPS, learning_rate=5e-3, bf16=bf16,
        **hkt,
    )
    trainer = HKTTrainer(child, args, train_dataset=image_dataset(GLOBAL_BATCH * STEPS), parent_model=parent)
    trainer.train()
    history = [log for log in trainer.state.log_history if "loss" in log]
    gates = trainer.hkt_adapter.gates
    return {
        "losses": [log["loss"] for log in history],
        "hkt_logs": [{k: v for k, v in log.items() if k.startswith("hkt/")} for log in history],
        "lambda": [float(torch.sigmoid(g.lam_logit.detach())) for g in gates if hasattr(g, "lam_logit")],
        "child_rank_diff": max_rank_difference(trainer.model),
        "adapter_rank_diff": max_rank_difference(trainer.hkt_adapter),
        "world_size": trainer.args.world_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    cli = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cli.settings:
            results[name] = run(name, SETTINGS[name], cli.per_device_batch, f"{tmp}/{name}", cli.bf16)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        Path(cli.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
