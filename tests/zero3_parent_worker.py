"""torchrun worker of `test_deepspeed.py`: a parent named by path under ZeRO-3 arguments, which transformers
partitions while loading it (`zero.Init`), so each process holds half of each parameter when `HKTTrainer` checks it.

Rank 0 writes: the parent fingerprint the trainer recorded and the one of the same weights whole; and the error the
trainer raised for the same parent with one NaN weight (None if it was not refused).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_worker import DEEPSPEED_SHM_OP, deepspeed_config  # noqa: E402
from helpers import image_dataset, tiny_vit, training_args  # noqa: E402

from hkt_hf import HKTTrainer  # noqa: E402
from hkt_hf.lineage import parent_fingerprint  # noqa: E402


def trainer_for(parent_dir: Path, output_dir: Path) -> HKTTrainer:
    args = training_args(output_dir, deepspeed=deepspeed_config(3), hkt_parent=str(parent_dir), max_steps=1,
                         per_device_train_batch_size=2)
    return HKTTrainer(model=tiny_vit(16, layers=2, seed=2), args=args, train_dataset=image_dataset(8))


def main() -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False
    # As Accelerate does on GPUs before the model is loaded (on CPU it leaves DeepSpeed's communication to
    # `deepspeed.initialize`, too late for `zero.Init` in `from_pretrained`, which then sees one process).
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank = dist.get_rank()
    healthy, damaged = tiny_vit(32, layers=2, seed=1), tiny_vit(32, layers=2, seed=1)
    with torch.no_grad():
        damaged.vit.layers[1].attention.q_proj.weight[0, 0] = float("nan")
    folders = {name: out.parent / name for name in ("healthy", "damaged")}
    if rank == 0:
        healthy.save_pretrained(folders["healthy"])
        damaged.save_pretrained(folders["damaged"])
    dist.barrier()
    recorded = trainer_for(folders["healthy"], out.parent / f"run-healthy-{rank}").hkt_lineage["parent_sha256"]
    try:
        trainer_for(folders["damaged"], out.parent / f"run-damaged-{rank}")
        refused = None
    except ValueError as err:
        refused = str(err)
    if rank == 0:
        out.write_text(json.dumps({"recorded": recorded, "whole": parent_fingerprint(healthy), "refused": refused}))
    dist.barrier()


if __name__ == "__main__":
    main()
