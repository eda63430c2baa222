"""Cost of one training step of HKT against the peer KD library (torchdistill), hkt-hf's own KD, the child alone and
the reference code's step.

All five methods train a ResNet-20 child (ResNet-56 parent) on the same real CIFAR-10 batches of 128 images,
interleaved round-robin over the repeats; the table reports medians and time ratios against torchdistill's KD step.
Also checks that torchdistill's and hkt-hf's KD losses agree on one batch, breaks each step into phases, and
measures the exported HKT child's inference latency against the plain child's, and both parameter counts.

    python benchmarks/step_cost.py            # full measurement (a few minutes)
    python benchmarks/step_cost.py --quick    # smoke run, under 2 minutes

The last printed line is one JSON object (ratios and raw numbers); `--out FILE` also writes it to FILE.

torchdistill's KD step is its own `DistillationBox` (torchdistill.core.distillation), built from an in-memory
config dict rather than a YAML file and driven the way its training loop drives it, minus the loop: teacher and
student forward hooks on `classifier` (its io dicts), `forward_process` (teacher first, under `no_grad` because the
config freezes it; then the student), `WeightedSumLoss` over one `KDLoss` term (alpha 1, beta 1, T = 4: CE + T^2 KL,
what hkt-hf's KD computes), and `post_forward_process` (backward, SGD step, zero_grad). Not run: its YAML parsing,
dataset/data-loader builders, logging and evaluation loop.

Memory: a CPU has no allocator peak counter, so what is measured is the activation memory each method holds
between forward and backward: the bytes of the distinct tensor storages autograd saves for backward during one step
(`torch.autograd.graph.saved_tensors_hooks`), parameters excluded. Transient buffers freed within a forward (such as
a no-grad parent's activations, one layer at a time) are not in it.

`--quick` uses batch 16, 3 step repeats and 10 latency repeats: a quick run of the same code, noisier than the full
one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
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
    MIB,
    MOMENTUM,
    WEIGHT_DECAY,
    Batch,
    CifarTensors,
    Step,
    breakdown_table,
    decoded_split,
    emit,
    load_pretrained,
    measure,
    median,
    missed_targets,
    parameter_storages,
    peer_missing,
    phase_breakdown,
    prepare,
    progress,
    recipe_args,
    rows_of,
    saved_for_backward,
    trainer_step,
)

from hkt_hf import HKTTrainer, HKTTrainingArguments  # noqa: E402
from hkt_hf.data.images import image_collator  # noqa: E402
from hkt_hf.mixture import GeneticGate  # noqa: E402

KD_TEMPERATURE = 4.0
METHODS = ("child", "torchdistill_kd", "hkt_kd", "hkt", "reference")
PEER = "torchdistill_kd"
TARGETS = {"hkt_over_peer_kd": 1.0, "hkt_kd_over_peer_kd": 1.0}


def torchdistill_box(child: torch.nn.Module, parent: torch.nn.Module) -> Any:
    """torchdistill's own DistillationBox for KD (see the module docstring for what of it runs)."""
    try:
        from torchdistill.core.distillation import DistillationBox
    except ImportError as err:
        raise peer_missing("torchdistill", err) from err
    hooks = {"forward_hook": {"output": ["classifier"]}, "forward_proc": "forward_batch_only"}
    kd = {"student_module_path": "classifier", "student_module_io": "output", "teacher_module_path": "classifier",
          "teacher_module_io": "output", "temperature": KD_TEMPERATURE, "alpha": 1.0, "beta": 1.0,
          "reduction": "batchmean"}
    config = {
        "num_epochs": 1,
        "teacher": {**hooks, "requires_grad": False},
        "student": {**hooks, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "criterion": {"key": "WeightedSumLoss",
                      "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }
    box = DistillationBox(parent.eval(), child, {}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)  # student in train mode, io dicts cleared, as at the start of each epoch
    return box


def box_step(box: Any) -> Step:
    """One step as torchdistill's training loop runs it: forward_process, then post_forward_process."""

    def step(batch: Batch) -> None:
        loss = box.forward_process(batch["pixel_values"], batch["labels"], {})
        box.post_forward_process(loss=loss)

    return step


def reference_step(child: torch.nn.Module, parent: torch.nn.Module, lam: float = 0.6) -> Step:
    """The reference code's step, from the method doc: two child forwards, two parent forwards with the parent in
    train mode and inside autograd (its gradients are computed and thrown away), three cross-entropies."""
    parent.train().requires_grad_(True)
    gate = GeneticGate(lam)
    optimizer = torch.optim.SGD(child.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(batch: Batch) -> None:
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


class Methods:
    """Every method's step on fresh pretrained child and parent copies (their updates never interact), with the
    modules of each phase for the breakdown and the objects the KD check and the export need."""

    def __init__(self, out_dir: Path, bf16: bool, batch: Batch):
        child0, parent0 = prepare(load_pretrained("resnet20"), bf16), prepare(load_pretrained("resnet56"), bf16)
        parent0.requires_grad_(False)
        fresh = copy.deepcopy
        common = dict(seed=0, max_steps=1000, bf16=False)  # with --bf16, autocast wraps each step of every method
        plain = Trainer(fresh(child0), recipe_args(TrainingArguments, out_dir / "child", **common))
        self.box = torchdistill_box(fresh(child0), fresh(parent0))
        self.hkt_kd = HKTTrainer(
            fresh(child0), recipe_args(HKTTrainingArguments, out_dir / "hkt_kd", **common, hkt_loss_weights=[1, 0, 0],
                                       hkt_kd_weight=1.0, hkt_kd_temperature=KD_TEMPERATURE),
            parent_model=fresh(parent0), train_dataset=rows_of(batch, BATCH_SIZE))
        self.hkt = HKTTrainer(fresh(child0), recipe_args(HKTTrainingArguments, out_dir / "hkt", **common),
                              parent_model=fresh(parent0), train_dataset=rows_of(batch, BATCH_SIZE))
        ref_child, ref_parent = fresh(child0), fresh(parent0)
        steps = {
            "child": trainer_step(plain),
            PEER: box_step(self.box),
            "hkt_kd": trainer_step(self.hkt_kd),
            "hkt": trainer_step(self.hkt),
            "reference": reference_step(ref_child, ref_parent),
        }
        self.steps = {name: with_autocast(step) for name, step in steps.items()} if bf16 else steps

        def phases(child: torch.nn.Module, parent: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
            return {"parent forward": [parent, parent.resnet], "child forward": [child, child.resnet],
                    "head replay": [child.classifier, parent.classifier]}

        self.phases = {
            "child": {"child forward": [plain.model]},
            PEER: phases(self.box.student_model, self.box.teacher_model),
            "hkt_kd": phases(self.hkt_kd.model, self.hkt_kd.parent_model),
            "hkt": phases(self.hkt.model, self.hkt.parent_model),
            "reference": phases(ref_child, ref_parent),
        }
        self.params = parameter_storages(self.hkt.model, self.hkt.parent_model)

    @torch.no_grad()
    def kd_losses(self, batch: Batch) -> dict[str, float]:
        """torchdistill's and hkt-hf's KD loss (both CE + T^2 KL, T = 4) on one batch, from identical weights, both
        children in train mode (batch statistics): the two implementations must agree. Printed, not asserted."""
        peer = self.box.forward_process(batch["pixel_values"], batch["labels"], {})
        ours = self.hkt_kd.compute_loss(self.hkt_kd.model.train(), dict(batch))
        return {"torchdistill": peer.item(), "hkt_hf": ours.item()}


def with_autocast(step: Step) -> Step:
    def run(batch: Batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(batch)

    return run


def latency(model: torch.nn.Module, batch: Batch) -> Step:
    model.eval()

    def run(_: Batch) -> None:
        with torch.no_grad():
            model(pixel_values=batch["pixel_values"])

    return run


def run(quick: bool, bf16: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch_size, n_batches, repeats, warmup, phase_repeats, latency_repeats = (
        (16, 2, 3, 1, 1, 10) if quick else (BATCH_SIZE, 4, 15, 2, 3, 40)
    )
    images, labels = decoded_split("train", rows=n_batches * BATCH_SIZE)
    loader = DataLoader(CifarTensors(images, labels, train=True), batch_size=batch_size, shuffle=True,
                        collate_fn=image_collator())
    batches = list(loader)
    with tempfile.TemporaryDirectory(prefix="hkt-step-cost-") as tmp:
        methods = Methods(Path(tmp), bf16, batches[0])
        kd_check = methods.kd_losses(batches[0])
        print(f"KD loss on one batch: torchdistill {kd_check['torchdistill']:.6f}, hkt-hf {kd_check['hkt_hf']:.6f}")
        progress(f"warm-up ({warmup} rounds), saved-for-backward, then {repeats} timed rounds")
        measure(methods.steps, batches, warmup)
        saved = {name: saved_for_backward(step, batches[0], methods.params)[0] for name, step in methods.steps.items()}
        times = measure(methods.steps, batches, repeats)
        progress("phase breakdown")
        breakdown = phase_breakdown(methods.steps, methods.phases, batches, phase_repeats)
        progress("export and inference latency")

        methods.hkt.save_model(str(Path(tmp) / "exported"))
        exported = AutoModelForImageClassification.from_pretrained(str(Path(tmp) / "exported"))
        plain = load_pretrained("resnet20")
        infer = {"plain_child": latency(plain, batches[0]), "exported_child": latency(exported, batches[0])}
        measure(infer, batches, 2)
        infer_times = measure(infer, batches, latency_repeats)

    step_s = {name: median(t) for name, t in times.items()}
    infer_s = {name: median(t) for name, t in infer_times.items()}
    return {
        "hkt_over_peer_kd": step_s["hkt"] / step_s[PEER],
        "hkt_kd_over_peer_kd": step_s["hkt_kd"] / step_s[PEER],
        "hkt_over_reference": step_s["hkt"] / step_s["reference"],
        "hkt_over_child": step_s["hkt"] / step_s["child"],
        "saved_hkt_over_peer_kd": saved["hkt"] / saved[PEER],
        "export_latency_ratio": infer_s["exported_child"] / infer_s["plain_child"],
        "params_exported_child": exported.num_parameters(),
        "params_plain_child": plain.num_parameters(),
        "kd_loss_check": kd_check,
        "step_s": step_s,
        "saved_mib": {k: v / MIB for k, v in saved.items()},
        "phases": breakdown,
        "inference_s": infer_s,
        "settings": {
            "quick": quick, "precision": "bf16 autocast, channels-last" if bf16 else "fp32",
            "batch_size": batch_size, "memory": "saved-for-backward bytes per step, parameters excluded",
            "repeats": repeats, "phase_repeats": phase_repeats, "latency_repeats": latency_repeats,
            "threads": torch.get_num_threads(), "child": "resnet20", "parent": "resnet56",
            "inference": f"fp32, batch {batch_size}, eval, no_grad",
        },
    }


def report(result: dict[str, Any]) -> str:
    bs = result["settings"]["batch_size"]
    rows = [f"| method (batch {bs}) | step (s, median) | x torchdistill KD | x child | saved-for-backward MiB |",
            "|---|---|---|---|---|"]
    for name in METHODS:
        s = result["step_s"][name]
        rows.append(f"| {name} | {s:.3f} | {s / result['step_s'][PEER]:.2f} | {s / result['step_s']['child']:.2f} "
                    f"| {result['saved_mib'][name]:.1f} |")
    check = result["kd_loss_check"]
    inf = result["inference_s"]
    rows += [
        "",
        f"KD loss on one batch (same weights): torchdistill {check['torchdistill']:.6f}, hkt-hf {check['hkt_hf']:.6f}.",
        "",
        f"| inference (batch {bs}, fp32) | latency (s, median) | parameters |",
        "|---|---|---|",
        f"| plain child | {inf['plain_child']:.4f} | {result['params_plain_child']:,} |",
        f"| exported HKT child | {inf['exported_child']:.4f} | {result['params_exported_child']:,} |",
    ]
    missed = missed_targets(result, TARGETS)
    if missed:
        rows += ["", "Targets missed: " + "; ".join(missed) + ". Where each step's time goes (seconds per step, share; "
                 "the rest is backward, loss terms, the gate and Python):", "", breakdown_table(result["phases"])]
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
    emit(result, "step_cost.py", "Step cost", report(result), args.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
