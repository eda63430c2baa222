"""Cost of one training step of HKT against the child alone, classic KD and the reference code's step.

All four methods train a ResNet-20 child (ResNet-56 parent) on the same real CIFAR-10 batches of 128 images,
interleaved round-robin over the repeats; the table reports medians. Also measures the exported HKT child's
inference latency against the plain child's, and both parameter counts.

    python benchmarks/step_cost.py            # full measurement (a few minutes)
    python benchmarks/step_cost.py --quick    # smoke run, under 2 minutes

The last printed line is one JSON object (ratios and raw numbers); `--out FILE` also writes it to FILE.

Memory: a CPU has no allocator peak counter, so what is measured is the activation memory each method holds
between forward and backward: the bytes of the distinct tensor storages autograd saves for backward during one step
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded. Transient buffers freed within a forward (such as
a no-grad parent's activations, one layer at a time) are not in it. `peak_mem_hkt_over_kd` is the ratio of these.

`--quick` uses batch 16 and 5 step repeats: a quick run of the same code, noisier than the full one.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BATCH_SIZE,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    CifarTensors,
    atomic_write_json,
    atomic_write_text,
    decoded_split,
    load_pretrained,
    median,
    recipe_args,
    round_robin,
    prepare,
    timed,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments  # noqa: E402
from hkt_hf.data.images import image_collator  # noqa: E402
from hkt_hf.mixture import GeneticGate  # noqa: E402
from hkt_hf.objective import kd_loss  # noqa: E402

KD_TEMPERATURE = 4.0
METHODS = ("child", "kd", "hkt", "reference")
Step = Callable[[dict[str, torch.Tensor]], None]


class KDTrainer(Trainer):
    """Classic KD at its cheapest, as the cost baseline: parent forward without autograd, child forward/backward,
    L = CE + T^2 KL at T = 4."""

    def __init__(self, *args: Any, parent: torch.nn.Module, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.parent = parent

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            parent_logits = self.parent(pixel_values=inputs["pixel_values"]).logits
        loss = outputs.loss + kd_loss(outputs.logits, parent_logits, KD_TEMPERATURE)
        return (loss, outputs) if return_outputs else loss


def trainer_step(trainer: Trainer) -> Step:
    """One optimizer step through `trainer.training_step` (the path `Trainer.train` runs), optimizer made lazily
    after the first step so that HKT's adapter, built on the first batch, is included."""
    trainer.current_gradient_accumulation_steps = 1  # set by `Trainer.train`'s loop, read by `training_step`

    def step(batch: dict[str, torch.Tensor]) -> None:
        trainer.training_step(trainer.model, batch)
        if trainer.optimizer is None:
            trainer.create_optimizer()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def reference_step(child: torch.nn.Module, parent: torch.nn.Module, lam: float = 0.6) -> Step:
    """The reference code's step, from the method doc: two child forwards, two parent forwards with the parent in
    train mode and inside autograd (its gradients are computed and thrown away), three cross-entropies."""
    parent.train().requires_grad_(True)
    gate = GeneticGate(lam)
    optimizer = torch.optim.SGD(child.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(batch: dict[str, torch.Tensor]) -> None:
        child.train()
        x, y = batch["pixel_values"], batch["labels"]
        logits = child(pixel_values=x).logits
        q = child.resnet(x).pooler_output
        parent(pixel_values=x)
        h = parent.resnet(x).pooler_output
        m = gate(q.float(), h.float()).mixed
        loss = (
            F.cross_entropy(logits.float(), y)
            + F.cross_entropy(child.classifier(m).float(), y)
            + F.cross_entropy(parent.classifier(m).float(), y)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parent.zero_grad(set_to_none=True)

    return step


def build_methods(out_dir: Path, bf16: bool) -> tuple[dict[str, Step], HKTTrainer]:
    """Fresh pretrained child and parent copies for every method, so their updates never interact."""
    child0, parent0 = prepare(load_pretrained("resnet20"), bf16), prepare(load_pretrained("resnet56"), bf16)
    parent0.requires_grad_(False)
    fresh = lambda m: copy.deepcopy(m)  # noqa: E731
    common = dict(seed=0, max_steps=1000, bf16=False)  # with --bf16, autocast wraps each step of every method
    plain = Trainer(fresh(child0), recipe_args(TrainingArguments, out_dir / "child", **common))
    kd = KDTrainer(fresh(child0), recipe_args(TrainingArguments, out_dir / "kd", **common), parent=fresh(parent0))
    hkt = HKTTrainer(fresh(child0), recipe_args(HKTTrainingArguments, out_dir / "hkt", **common),
                     parent_model=fresh(parent0))
    steps = {
        "child": trainer_step(plain),
        "kd": trainer_step(kd),
        "hkt": trainer_step(hkt),
        "reference": reference_step(fresh(child0), fresh(parent0)),
    }
    if bf16:
        steps = {name: with_autocast(step) for name, step in steps.items()}
    return steps, hkt


def with_autocast(step: Step) -> Step:
    def run(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(batch)

    return run


def saved_tensor_bytes(step: Step, batch: dict[str, torch.Tensor], params: set[int]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward during one step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(storages.values())


def latency(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Step:
    model.eval()

    def run(_: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            model(pixel_values=batch["pixel_values"])

    return run


def measure(steps: dict[str, Step], batches: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every step, interleaved round-robin, each round on the same batch for every method."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i, name in enumerate(round_robin(names, repeats)):
        batch = batches[(i // len(names)) % len(batches)]
        times[name].append(timed(lambda: steps[name](batch)))
    return times


def run(quick: bool, bf16: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch_size, n_batches, repeats, warmup, latency_repeats = (16, 2, 5, 1, 40) if quick else (BATCH_SIZE, 4, 15, 2, 40)
    images, labels = decoded_split("train", rows=n_batches * BATCH_SIZE)
    loader = DataLoader(CifarTensors(images, labels, train=True), batch_size=batch_size, shuffle=True,
                        collate_fn=image_collator())
    batches = list(loader)
    with tempfile.TemporaryDirectory(prefix="hkt-step-cost-") as tmp:
        steps, hkt_trainer = build_methods(Path(tmp), bf16)
        measure(steps, batches, warmup)
        params = {p.untyped_storage().data_ptr() for t in (hkt_trainer.model, hkt_trainer.parent_model)
                  for p in t.parameters()}
        saved = {name: saved_tensor_bytes(step, batches[0], params) for name, step in steps.items()}
        times = measure(steps, batches, repeats)

        hkt_trainer.save_model(str(Path(tmp) / "exported"))
        exported = AutoModelForImageClassification.from_pretrained(str(Path(tmp) / "exported"))
        plain = load_pretrained("resnet20")
        infer = {"plain_child": latency(plain, batches[0]), "exported_child": latency(exported, batches[0])}
        measure(infer, batches, 2)
        infer_times = measure(infer, batches, latency_repeats)

    step_s = {name: median(t) for name, t in times.items()}
    infer_s = {name: median(t) for name, t in infer_times.items()}
    mib = 2.0**20
    return {
        "hkt_over_kd": step_s["hkt"] / step_s["kd"],
        "hkt_over_reference": step_s["hkt"] / step_s["reference"],
        "hkt_over_child": step_s["hkt"] / step_s["child"],
        "peak_mem_hkt_over_kd": saved["hkt"] / saved["kd"],
        "export_latency_ratio": infer_s["exported_child"] / infer_s["plain_child"],
        "params_exported_child": exported.num_parameters(),
        "params_plain_child": plain.num_parameters(),
        "step_s": step_s,
        "saved_mib": {k: v / mib for k, v in saved.items()},
        "inference_s": infer_s,
        "settings": {
            "quick": quick, "precision": "bf16 autocast, channels-last" if bf16 else "fp32",
            "batch_size": batch_size, "memory": "saved-for-backward bytes per step, parameters excluded",
            "repeats": repeats, "latency_repeats": latency_repeats,
            "threads": torch.get_num_threads(), "child": "resnet20", "parent": "resnet56",
            "inference": f"fp32, batch {batch_size}, eval, no_grad",
        },
    }


def table(result: dict[str, Any]) -> str:
    bs = result["settings"]["batch_size"]
    rows = [f"| method (batch {bs}) | step (s, median) | x child | saved-for-backward MiB |", "|---|---|---|---|"]
    child = result["step_s"]["child"]
    for name in METHODS:
        s = result["step_s"][name]
        rows.append(f"| {name} | {s:.3f} | {s / child:.2f} | {result['saved_mib'][name]:.1f} |")
    inf = result["inference_s"]
    rows += [
        "",
        f"| inference (batch {bs}, fp32) | latency (s, median) | parameters |",
        "|---|---|---|",
        f"| plain child | {inf['plain_child']:.4f} | {result['params_plain_child']:,} |",
        f"| exported HKT child | {inf['exported_child']:.4f} | {result['params_exported_child']:,} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run under 2 minutes")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast + channels-last (default fp32, as cifar10.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the result to this .json file and its table to the same name with .md")
    args = parser.parse_args(argv)
    result = run(args.quick, args.bf16, args.threads)
    result["command"] = shlex.join(["python", "benchmarks/step_cost.py", *(argv if argv is not None else sys.argv[1:])])
    print(table(result))
    if args.out is not None:
        atomic_write_json(args.out, result)
        atomic_write_text(args.out.with_suffix(".md"), f"# Step cost\n\n`{result['command']}`\n\n{table(result)}\n")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
