"""Memory-saving training modes with HKT: bf16 and fp16 mixed precision, and gradient checkpointing of the child.

What runs on a CPU: bf16 goes through the Trainer's own `bf16=True` flag (Accelerate's CPU autocast). Accelerate
ignores `fp16=True` on a CPU (no autocast, no grad scaler), so the fp16 test switches on exactly what it would set
up on a GPU (fp16 autocast of the forward and a `GradScaler`), on the CPU; the CUDA kernels themselves are not run.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn

from helpers import ForwardCounter, sentiment_dataset, tiny_bert, training_args, word_tokenizer
from hkt_hf import HKTTrainer
from hkt_hf.objective import StepResult

DEEP_CARRIER = "bert.encoder.layer.0=bert.encoder.layer.0"


def tokenized(n: int) -> Dataset:
    tok = word_tokenizer()
    data = sentiment_dataset(n).map(lambda b: tok(b["text"], padding="max_length", max_length=12), batched=True)
    return data.rename_column("label", "labels").remove_columns(["text"]).with_format("torch")


class DtypeRecordingTrainer(HKTTrainer):
    """Records the dtype of every loss part and gate tensor, and of every input of the child's classifier."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hkt_dtypes: set[torch.dtype] = set()
        self.head_input_dtypes: set[torch.dtype] = set()
        self.model.classifier.register_forward_pre_hook(self._record_head_input)

    def _record_head_input(self, head: nn.Module, args: tuple) -> None:
        if head.training:  # not the shape probe, which runs in eval mode before training starts
            self.head_input_dtypes.add(args[0].dtype)

    def _record(self, result: StepResult) -> None:
        self.hkt_dtypes.add(result.loss.dtype)
        self.hkt_dtypes.update(v.dtype for v in result.parts.values())
        self.hkt_dtypes.update(t.dtype for gate in result.gates.values() for t in gate)
        super()._record(result)


def bert_pair(tok_size: int) -> tuple[nn.Module, nn.Module]:
    return tiny_bert(32, tok_size, layers=2, seed=1), tiny_bert(16, tok_size, layers=2, seed=2)


def finite_logs(trainer: HKTTrainer, allowed: tuple[str, ...] = ()) -> list[dict]:
    """The training logs, after checking that every value except those named in `allowed` is finite."""
    logs = [log for log in trainer.state.log_history if "loss" in log]
    for log in logs:
        bad = {k: v for k, v in log.items() if isinstance(v, float) and not math.isfinite(v) and k not in allowed}
        assert not bad, f"non-finite values logged at step {log.get('step')}: {bad}"
    return logs


def bf16_and_fp32_runs(tmp_path, steps: int) -> list[DtypeRecordingTrainer]:
    trainers = []
    for bf16 in (True, False):
        parent, child = bert_pair(word_tokenizer().vocab_size)
        args = training_args(tmp_path / f"bf16-{bf16}", bf16=bf16, max_steps=steps, learning_rate=3e-3,
                             hkt_gate="learned", hkt_kd_weight=0.5)
        trainers.append(DtypeRecordingTrainer(child, args, train_dataset=tokenized(64), parent_model=parent))
        trainers[-1].train()
    return trainers


def test_bf16_run_keeps_hkt_arithmetic_in_fp32_stays_finite_and_tracks_fp32(tmp_path):
    bf16, fp32 = bf16_and_fp32_runs(tmp_path, steps=12)
    assert bf16.accelerator.native_amp and not fp32.accelerator.native_amp
    # BERT's pooler output (the head input) is bf16 under autocast, in the child's pass and in the head replay on m.
    assert bf16.head_input_dtypes == {torch.bfloat16} and fp32.head_input_dtypes == {torch.float32}
    assert bf16.hkt_dtypes == {torch.float32}
    bf16_logs, fp32_logs = finite_logs(bf16), finite_logs(fp32)
    assert len(bf16_logs) == len(fp32_logs) == 12
    # bf16 keeps 8 bits of mantissa (relative error ~4e-3 per rounding): the total loss (~2.1) stays within 0.05
    # of the fp32 run, while differing from it at all shows that autocast really changed the arithmetic.
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(bf16_logs, fp32_logs)]
    assert 0 < max(gaps) < 0.05, gaps


def test_fp16_autocast_and_grad_scaler_with_parameters_left_without_gradient(tmp_path):
    parent, child = bert_pair(word_tokenizer().vocab_size)
    child.unused_head = nn.Linear(16, 2)  # a child parameter that no HKT term reaches: its grad stays None
    args = training_args(tmp_path, fp16=True, max_steps=8, learning_rate=3e-3, hkt_gate="learned",
                         hkt_carriers=[DEEP_CARRIER], hkt_loss_weights=[1.0, 0.0, 1.0])
    trainer = DtypeRecordingTrainer(child, args, train_dataset=tokenized(32), parent_model=parent)
    # What Accelerate sets up for fp16 on a GPU; on a CPU it leaves both off.
    assert trainer.accelerator.scaler is None
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=4)
    before = {n: p.detach().clone() for n, p in child.named_parameters()}
    trainer.train()
    assert trainer.head_input_dtypes == {torch.float16}
    assert trainer.hkt_dtypes == {torch.float32}
    # An inf gradient norm marks a step the scaler skipped (scale too high: it halves it); every loss stays finite.
    logs = finite_logs(trainer, allowed=("grad_norm",))
    assert len(logs) == 8 and all(math.isfinite(log["loss"]) for log in logs)
    assert 0 < trainer.accelerator.scaler.get_scale() < math.inf
    assert child.unused_head.weight.grad is None
    assert torch.equal(child.unused_head.weight, before["unused_head.weight"])
    moved = [n for n, p in child.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in moved and "bert.encoder.layer.0.output.dense.weight" in moved
    assert all(torch.isfinite(p).all() for p in child.parameters())


def train_bert(tmp_path, carrier: str, checkpointing: bool) -> tuple[list[float], torch.Tensor, int]:
    parent, child = bert_pair(word_tokenizer().vocab_size)
    # Inside the layer: transformers checkpoints `forward`, so the layer's own hooks do not see the recomputation.
    counter = ForwardCounter(child.bert.encoder.layer[1].output.dense)
    args = training_args(tmp_path / f"gc-{checkpointing}", max_steps=2, optim="sgd", hkt_gate="learned",
                         gradient_checkpointing=checkpointing, hkt_carriers=[carrier])
    trainer = HKTTrainer(child, args, train_dataset=tokenized(16), parent_model=parent)
    trainer.train()
    counter.remove()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    weights = torch.cat([p.detach().flatten() for p in child.parameters()] +
                        [p.detach().flatten() for p in trainer.hkt_adapter.parameters()])
    return losses, weights, counter.calls


def test_gradient_checkpointing_gives_the_same_training_with_auto_and_deep_carriers(tmp_path):
    for carrier in ("auto", DEEP_CARRIER, "bert.encoder.layer.1=bert.encoder.layer.1"):
        plain_losses, plain_weights, plain_calls = train_bert(tmp_path, carrier, checkpointing=False)
        gc_losses, gc_weights, gc_calls = train_bert(tmp_path, carrier, checkpointing=True)
        # Checkpointing really ran: the last layer is recomputed in every backward pass.
        assert gc_calls > plain_calls, carrier
        assert gc_losses == plain_losses, carrier
        torch.testing.assert_close(gc_weights, plain_weights, rtol=0, atol=1e-6, msg=carrier)
