"""Cost of one training step of HKT against the peer KD library (torchdistill), hkt-hf's own KD, the child alone and
the reference code's step.

All five methods train a ResNet-20 child (ResNet-56 parent) on the same real CIFAR-10 batches of 128 images,
interleaved round-robin over the repeats; the table reports medians and time ratios against torchdistill's KD step.
Also checks that torchdistill's and hkt-hf's KD losses agree on one batch, breaks each step into phases, and
measures the exported HKT child's inference latency against the plain child's, and both parameter counts.

    python benchmarks/step_cost.py            # full measurement: 15 rounds (a few minutes on a quiet machine)
    python benchmarks/step_cost.py --quick    # the same measurement with 5 rounds: same ratios, wider spread
    python benchmarks/step_cost.py --smoke    # batch 16, one round: checks that it runs, its ratios mean nothing

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

Every mode but `--smoke` times the same batch of 128 after the same warm-up (`step_timing.WARMUP_ROUNDS`); each
ratio is the median of per-round ratios, reported with its spread (see `step_timing`).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import BATCH_SIZE, LR, MOMENTUM, WEIGHT_DECAY, CifarTensors, decoded_split, load_pretrained
from common import prepare, recipe_args
from comparison import kd_settings
import step_timing as timing
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from hkt_hf import HKTTrainer, HKTTrainingArguments
from hkt_hf.apps.data.images import image_collator
from hkt_hf.mixture import GeneticGate

KD_TEMPERATURE = 4.0
METHODS = ("child", "torchdistill_kd", "hkt_kd", "hkt", "reference")
PEER = "torchdistill_kd"
TARGETS = {"hkt_over_peer_kd": 1.0, "hkt_kd_over_peer_kd": 1.0}
RATIOS = {"hkt_over_peer_kd": ("hkt", PEER), "hkt_kd_over_peer_kd": ("hkt_kd", PEER),
          "hkt_over_reference": ("hkt", "reference"), "hkt_over_child": ("hkt", "child"),
          **{f"{name}_over_peer_kd": (name, PEER) for name in METHODS if name not in ("hkt", "hkt_kd", PEER)}}


@dataclass(frozen=True)
class Mode:
    """What a run times: `quick` differs from `full` only in how many rounds, `smoke` also in the shapes."""

    batch_size: int
    batches: int
    repeats: int
    phase_repeats: int
    latency_repeats: int


MODES = {"full": Mode(BATCH_SIZE, 4, 15, 3, 40), "quick": Mode(BATCH_SIZE, 4, 5, 0, 10), "smoke": Mode(16, 2, 1, 1, 2)}


def torchdistill_box(child: torch.nn.Module, parent: torch.nn.Module) -> Any:
    """torchdistill's own DistillationBox for KD (see the module docstring for what of it runs)."""
    try:
        from torchdistill.core.distillation import DistillationBox
    except ImportError as err:
        raise timing.peer_missing("torchdistill", err) from err
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


def box_step(box: Any) -> timing.Step:
    """One step as torchdistill's training loop runs it: forward_process, then post_forward_process."""

    def step(batch: timing.Batch) -> None:
        loss = box.forward_process(batch["pixel_values"], batch["labels"], {})
        box.post_forward_process(loss=loss)

    return step


def reference_step(child: torch.nn.Module, parent: torch.nn.Module, lam: float = 0.6) -> timing.Step:
    """The reference code's step, from the method doc: two child forwards, two parent forwards with the parent in
    train mode and inside autograd (its gradients are computed and thrown away), three cross-entropies."""
    parent.train().requires_grad_(True)
    gate = GeneticGate(lam)
    optimizer = torch.optim.SGD(child.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(batch: timing.Batch) -> None:
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

    def __init__(self, out_dir: Path, bf16: bool, batch: timing.Batch):
        child0, parent0 = prepare(load_pretrained("resnet20"), bf16), prepare(load_pretrained("resnet56"), bf16)
        parent0.requires_grad_(False)
        fresh = copy.deepcopy
        common = dict(seed=0, max_steps=1000, bf16=False)  # with --bf16, autocast wraps each step of every method
        plain = Trainer(fresh(child0), recipe_args(TrainingArguments, out_dir / "child", **common))
        self.box = torchdistill_box(fresh(child0), fresh(parent0))
        self.hkt_kd = HKTTrainer(
            fresh(child0), recipe_args(HKTTrainingArguments, out_dir / "hkt_kd", **common,
                                       **kd_settings(weight=1.0, temperature=KD_TEMPERATURE)),
            parent_model=fresh(parent0), train_dataset=timing.rows_of(batch, BATCH_SIZE))
        self.hkt = HKTTrainer(fresh(child0), recipe_args(HKTTrainingArguments, out_dir / "hkt", **common),
                              parent_model=fresh(parent0), train_dataset=timing.rows_of(batch, BATCH_SIZE))
        ref_child, ref_parent = fresh(child0), fresh(parent0)
        steps = {
            "child": timing.trainer_step(plain),
            PEER: box_step(self.box),
            "hkt_kd": timing.trainer_step(self.hkt_kd),
            "hkt": timing.trainer_step(self.hkt),
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
        self.params = timing.parameter_storages(self.hkt.model, self.hkt.parent_model)

    @torch.no_grad()
    def kd_losses(self, batch: timing.Batch) -> dict[str, float]:
        """torchdistill's and hkt-hf's KD loss (both CE + T^2 KL, T = 4) on one batch, from identical weights, both
        children in train mode (batch statistics): the two implementations must agree. Printed, not asserted."""
        peer = self.box.forward_process(batch["pixel_values"], batch["labels"], {})
        ours = self.hkt_kd.compute_loss(self.hkt_kd.model.train(), dict(batch))
        return {"torchdistill": peer.item(), "hkt_hf": ours.item()}


def with_autocast(step: timing.Step) -> timing.Step:
    def run(batch: timing.Batch) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(batch)

    return run


def latency(model: torch.nn.Module, batch: timing.Batch) -> timing.Step:
    model.eval()

    def run(_: timing.Batch) -> None:
        with torch.no_grad():
            model(pixel_values=batch["pixel_values"])

    return run


def run(mode_name: str, bf16: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    mode = MODES[mode_name]
    images, labels = decoded_split("train", rows=mode.batches * BATCH_SIZE)
    loader = DataLoader(CifarTensors(images, labels, train=True), batch_size=mode.batch_size, shuffle=True,
                        collate_fn=image_collator())
    batches = list(loader)[:mode.batches]
    with tempfile.TemporaryDirectory(prefix="hkt-step-cost-") as tmp:
        methods = Methods(Path(tmp), bf16, batches[0])
        kd_check = methods.kd_losses(batches[0])
        print(f"KD loss on one batch: torchdistill {kd_check['torchdistill']:.6f}, hkt-hf {kd_check['hkt_hf']:.6f}")
        timing.progress(f"warm-up ({timing.WARMUP_ROUNDS} rounds), saved-for-backward, "
                        f"then {mode.repeats} timed rounds")
        timing.warm_up(methods.steps, batches)
        saved = {name: timing.saved_for_backward(step, batches[0], methods.params)[0]
                 for name, step in methods.steps.items()}
        times = timing.measure(methods.steps, batches, mode.repeats)
        timing.progress("phase breakdown" if mode.phase_repeats else "no phase breakdown")
        breakdown = timing.phase_breakdown(methods.steps, methods.phases, batches, mode.phase_repeats)
        timing.progress("export and inference latency")

        methods.hkt.save_model(str(Path(tmp) / "exported"))
        exported = AutoModelForImageClassification.from_pretrained(str(Path(tmp) / "exported"))
        plain = load_pretrained("resnet20")
        infer = {"plain_child": latency(plain, batches[0]), "exported_child": latency(exported, batches[0])}
        timing.warm_up(infer, batches)
        infer_times = timing.measure(infer, batches, mode.latency_repeats)

    result = timing.ratio_results(times, RATIOS)
    latency_ratio = timing.ratio_results(infer_times, {"export_latency_ratio": ("exported_child", "plain_child")})
    result["spread"].update(latency_ratio.pop("spread"))
    return {
        **result,
        **latency_ratio,
        "saved_hkt_over_peer_kd": saved["hkt"] / saved[PEER],
        "params_exported_child": exported.num_parameters(),
        "params_plain_child": plain.num_parameters(),
        "kd_loss_check": kd_check,
        "step_s": {name: timing.median(t) for name, t in times.items()},
        "saved_mib": {k: v / timing.MIB for k, v in saved.items()},
        "phases": breakdown,
        "inference_s": {name: timing.median(t) for name, t in infer_times.items()},
        "settings": {
            "mode": mode_name, **asdict(mode), "warmup_rounds": timing.WARMUP_ROUNDS,
            "precision": "bf16 autocast, channels-last" if bf16 else "fp32",
            "memory": "saved-for-backward bytes per step, parameters excluded",
            "threads": torch.get_num_threads(), "child": "resnet20", "parent": "resnet56",
            "inference": f"fp32, batch {mode.batch_size}, eval, no_grad",
        },
    }


def peer_key(name: str) -> str:
    return next(key for key, (method, against) in RATIOS.items() if method == name and against == PEER)


def report(result: dict[str, Any]) -> str:
    settings = result["settings"]
    bs = settings["batch_size"]
    rows = [f"{settings['mode']} run: batch {bs}, {settings['precision']}, {settings['warmup_rounds']} warm-up rounds, "
            f"{settings['repeats']} timed rounds, {settings['threads']} threads. Ratios: median of the per-round "
            "ratios (middle half of the rounds, all rounds)."
            + (" A smoke run: its shapes are not the benchmark's, its ratios mean nothing."
               if settings["mode"] == "smoke" else ""), "",
            f"| method (batch {bs}) | step (s, median) | x torchdistill KD | saved-for-backward MiB |",
            "|---|---|---|---|"]
    for name in METHODS:
        ratio = "1" if name == PEER else timing.spread_text(result["spread"][peer_key(name)])
        rows.append(f"| {name} | {result['step_s'][name]:.3f} | {ratio} | {result['saved_mib'][name]:.1f} |")
    check = result["kd_loss_check"]
    inf = result["inference_s"]
    rows += [
        "",
        f"HKT over the child alone: {timing.spread_text(result['spread']['hkt_over_child'])}; over the reference step: "
        f"{timing.spread_text(result['spread']['hkt_over_reference'])}.",
        "",
        f"KD loss on one batch (same weights): torchdistill {check['torchdistill']:.6f}, hkt-hf {check['hkt_hf']:.6f}.",
        "",
        f"| inference (batch {bs}, fp32) | latency (s, median) | parameters |",
        "|---|---|---|",
        f"| plain child | {inf['plain_child']:.4f} | {result['params_plain_child']:,} |",
        f"| exported HKT child | {inf['exported_child']:.4f} | {result['params_exported_child']:,} |",
        "",
        f"Exported over plain latency: {timing.spread_text(result['spread']['export_latency_ratio'])}.",
    ]
    rows += timing.targets_section(result, TARGETS, "the rest is backward, loss terms, the gate and Python")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = timing.step_cost_parser(__doc__.split("\n\n")[0], "the full run's shapes and warm-up, 5 rounds, not 15",
                                     "batch 16, one round: checks that it runs (CI)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast + channels-last (default fp32, as cifar10.py)")
    args = parser.parse_args(argv)
    result = run(timing.mode_of(args), args.bf16, args.threads)
    timing.emit(result, "step_cost.py", "Step cost", report(result), args.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
