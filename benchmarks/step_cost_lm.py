"""Cost of one training step of HKT on a causal language model against TRL's distillation trainers.

A Llama-style parent (6 layers x 256 hidden by default) and child (2 x 128), shared vocabulary of 32,000, trained on
the same fixed-seed random token batches, every method interleaved round-robin over the repeats; the table reports
medians and time ratios against TRL's `GKDTrainer` step. Both models are randomly initialised: the step's cost does
not depend on what the weights are.

    python benchmarks/step_cost_lm.py            # full measurement, sequence 256, 7 rounds (see the README)
    python benchmarks/step_cost_lm.py --quick    # the same sizes and warm-up, 4 rounds: same ratios, wider spread
    python benchmarks/step_cost_lm.py --seq 512  # the longer sequence, about twice the time
    python benchmarks/step_cost_lm.py --smoke    # tiny sizes, one round: checks that it runs, its ratios mean nothing

What runs for each method (all through `training_step` of a transformers `Trainer` subclass, then an SGD step):

- `child`: plain `Trainer`, the child's own next-token cross-entropy.
- `gkd`: TRL's `GKDTrainer` with `lmbda=0` (never generates: `training_step` draws `random() <= 0`) and `beta=0`
  (forward KL(teacher || student) per token), its own `compute_loss`: student forward, teacher forward under no_grad,
  full [batch, seq, vocab] log-softmaxes of both. Built with a stand-in tokenizer and the default collator, so none of
  its dataset preprocessing runs.
- `chunked`: TRL's `DistillationTrainer` (`beta=0`, T = 1), its own `compute_loss`, which runs both backbones and the
  chunked divergence (`ChunkedDivergenceFunction`: the lm_head projection and the KL on [tokens, vocab] tiles,
  recomputed in backward, never keeping the full logits). Its `_prepare_inputs` (on-policy generation) is replaced by
  the plain `Trainer` one; the batch is given as a one-token prompt and the rest of the sequence as completion.
- `hkt_kd`: `HKTTrainer`, loss weights 1 0 0, KD weight 1, T = 1, carrier `lm_head:input=lm_head:input`.
- `hkt_lm_head`: `HKTTrainer`, reference settings (weights 1 1 1, genetic gate, no KD), carrier
  `lm_head:input=lm_head:input` (hidden 256 -> 128 through a trained aligner).
- `hkt_layer`: the same with a decoder-layer carrier, `model.layers.5=model.layers.1` (last layer of each).
- `hkt_layers_kd`: the language-model benchmark's recommended `hkt-layers+kd`: every child decoder layer paired with
  the parent's at the same relative depth (`lm_task.layer_carriers`: `model.layers.2=model.layers.0`,
  `model.layers.5=model.layers.1`), weights 1 1 1, genetic gate, plus KD (weight 1, T = 1).
- `hint_kd`: its strongest baseline there, hint + KD (`baselines.BaselineTrainer`: MSE through a trained projection
  at the same layer pairs, plus the package's KD term, weight 1, T = 1).

`--vocab 4096 --seq 128 --batch 16` times the language-model benchmark's own shapes (`lm_task.FULL_SIZES`).

Every mode but `--smoke` times the full sizes after the same warm-up (`step_timing.WARMUP_ROUNDS`); each ratio is
the median of per-round ratios, reported with its spread (see `step_timing`).

If an hkt-hf method fails on its first step, its error is recorded in the output (`errors`) and the others go on.
Memory: the bytes of the distinct non-parameter storages autograd saves for backward during one step, and how many of
them are vocabulary-sized (saved as a tensor whose last dimension is the vocabulary).

The last printed line is one JSON object (ratios and raw numbers); `--out FILE` also writes it to FILE (+ `.md`).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import step_timing as timing
import torch
from baselines import BaselineTrainer
from common import recipe_args
from comparison import kd_settings
from datasets import Dataset
from lm_task import layer_carriers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.data.data_collator import default_data_collator

from hkt_hf import HKTTrainer, HKTTrainingArguments

PEER = "gkd"
HKT_METHODS = ("hkt_kd", "hkt_lm_head", "hkt_layer", "hkt_layers_kd")
BASELINE = "hint_kd"
METHODS = ("child", PEER, "chunked", BASELINE, *HKT_METHODS)
LM_HEAD_CARRIER = "lm_head:input=lm_head:input"
RATIO_KEYS = {"hkt_lm_over_peer": "hkt_lm_head", "hkt_kd_lm_over_peer": "hkt_kd", "hkt_layer_lm_over_peer": "hkt_layer",
              "hkt_layers_kd_lm_over_peer": "hkt_layers_kd", "hint_kd_over_peer": BASELINE,
              "chunked_over_peer": "chunked", "child_over_peer": "child"}
# Every ratio reported: each method against GKD, and the LM benchmark's HKT setting against its strongest baseline.
RATIO_PAIRS = {**{key: (name, PEER) for key, name in RATIO_KEYS.items()},
               "hkt_layers_kd_over_hint_kd": ("hkt_layers_kd", BASELINE)}
TARGETS = {"hkt_lm_over_peer": 1.0, "hkt_kd_lm_over_peer": 1.0, "hkt_layer_lm_over_peer": 1.0,
           "saved_mib_hkt_lm_over_peer": 0.5}


@dataclass(frozen=True)
class Sizes:
    vocab: int
    seq: int
    batch: int
    parent_layers: int
    parent_hidden: int
    child_layers: int
    child_hidden: int
    repeats: int
    phase_repeats: int


FULL = Sizes(vocab=32_000, seq=256, batch=4, parent_layers=6, parent_hidden=256, child_layers=2, child_hidden=128,
             repeats=7, phase_repeats=2)
MODES = {
    "full": FULL,
    "quick": replace(FULL, repeats=4, phase_repeats=0),  # what the full run measures, in fewer rounds
    "smoke": Sizes(vocab=2_000, seq=64, batch=4, parent_layers=6, parent_hidden=64, child_layers=2, child_hidden=32,
                   repeats=1, phase_repeats=1),
}


def llama(layers: int, hidden: int, sizes: Sizes) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=sizes.seq, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """TRL's trainers need a tokenizer object (pad and eos ids); nothing is ever tokenized with it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def token_batches(sizes: Sizes, count: int) -> list[timing.Batch]:
    """Fixed-seed random tokens (ids 3.. so none is pad or eos), every position trained on."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, sizes.vocab, (sizes.batch, sizes.seq), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def as_prompt_completion(batch: timing.Batch) -> timing.Batch:
    """The batch in DistillationTrainer's layout: a one-token prompt, the rest as completion (the same next-token
    positions GKD trains on)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return {"prompt_ids": ids[:, :1], "prompt_mask": mask[:, :1], "completion_ids": ids[:, 1:],
            "completion_mask": mask[:, 1:]}


def step_args(args_class: type[TrainingArguments], out_dir: Path, sizes: Sizes, **extra: Any) -> TrainingArguments:
    """The arguments of every trainer timed here (seed 0, fp32, the batch of `sizes`), plus `extra`."""
    return recipe_args(args_class, out_dir, seed=0, max_steps=1000, bf16=False, batch_size=sizes.batch, **extra)


def peer_trainers(child: nn.Module, parent: nn.Module, out_dir: Path, sizes: Sizes, batch: timing.Batch
                  ) -> dict[str, Trainer]:
    """GKD and the chunked DistillationTrainer on copies of the models. SFTTrainer (GKD's base) insists on a
    training set: it gets the rows of `batch`, never read since steps are driven directly."""
    try:
        from trl import DistillationConfig, DistillationTrainer
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as err:
        raise timing.peer_missing("trl", err) from err

    class NoGenerationDistillation(DistillationTrainer):
        """DistillationTrainer on given completions: the plain Trainer input preparation instead of generation."""

        def _prepare_inputs(self, inputs: timing.Batch) -> timing.Batch:
            return Trainer._prepare_inputs(self, inputs)

    tokenizer = stand_in_tokenizer()
    rows = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    gkd = GKDTrainer(
        model=copy.deepcopy(child), teacher_model=copy.deepcopy(parent), processing_class=tokenizer,
        args=step_args(GKDConfig, out_dir / "gkd", sizes, lmbda=0.0, beta=0.0, max_length=sizes.seq),
        data_collator=default_data_collator, train_dataset=rows,
    )
    chunked = NoGenerationDistillation(
        model=copy.deepcopy(child), teacher_model=copy.deepcopy(parent), processing_class=tokenizer,
        args=step_args(DistillationConfig, out_dir / "chunked", sizes, beta=0.0, temperature=1.0),
    )
    return {PEER: gkd, "chunked": chunked}


def hkt_trainers(child: nn.Module, parent: nn.Module, out_dir: Path, sizes: Sizes, batch: timing.Batch
                 ) -> dict[str, HKTTrainer]:
    layer_carrier = f"model.layers.{sizes.parent_layers - 1}=model.layers.{sizes.child_layers - 1}"
    settings = {
        "hkt_kd": dict(hkt_carriers=[LM_HEAD_CARRIER], **kd_settings(weight=1.0, temperature=1.0)),
        "hkt_lm_head": dict(hkt_carriers=[LM_HEAD_CARRIER]),
        "hkt_layer": dict(hkt_carriers=[layer_carrier]),
        "hkt_layers_kd": dict(hkt_carriers=layer_carriers(sizes.parent_layers, sizes.child_layers),
                              hkt_kd_weight=1.0, hkt_kd_temperature=1.0),
    }
    return {
        name: HKTTrainer(copy.deepcopy(child), step_args(HKTTrainingArguments, out_dir / name, sizes, **extra),
                         parent_model=copy.deepcopy(parent), train_dataset=timing.rows_of(batch))
        for name, extra in settings.items()
    }


def hint_kd_trainer(child: nn.Module, parent: nn.Module, out_dir: Path, sizes: Sizes, batch: timing.Batch
                    ) -> BaselineTrainer:
    return BaselineTrainer(copy.deepcopy(child), step_args(TrainingArguments, out_dir / BASELINE, sizes),
                           parent_model=copy.deepcopy(parent), pairs=layer_carriers(sizes.parent_layers,
                                                                                    sizes.child_layers),
                           hint="mse", kd_weight=1.0, kd_temperature=1.0, train_dataset=timing.rows_of(batch))


def lm_phases(child: nn.Module, parent: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules timed per phase: whole models or their backbones (TRL's chunked path calls the backbone
    directly), and the heads when called on their own (head replays)."""
    return {"parent forward": [parent, parent.model], "child forward": [child, child.model],
            "head replay": [child.lm_head, parent.lm_head]}


def first_steps(steps: dict[str, timing.Step], batch: timing.Batch) -> dict[str, str]:
    """Run every method once (a warm-up); an hkt-hf method that fails is dropped and its error returned, so the
    others are still measured. A peer's failure is not caught."""
    errors = {}
    for name in list(steps):
        try:
            steps[name](batch)
        except Exception as err:  # noqa: BLE001 - recorded in the output, by design
            if name not in HKT_METHODS:
                raise
            errors[name] = f"{type(err).__name__}: {err}"
            print(f"{name} failed on its first step and is left out: {errors[name]}")
            del steps[name]
    return errors


def run(sizes: Sizes, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    parent0 = llama(sizes.parent_layers, sizes.parent_hidden, sizes).requires_grad_(False)
    child0 = llama(sizes.child_layers, sizes.child_hidden, sizes)
    batches = token_batches(sizes, 2)
    with tempfile.TemporaryDirectory(prefix="hkt-step-cost-lm-") as tmp:
        plain = Trainer(copy.deepcopy(child0), step_args(TrainingArguments, Path(tmp) / "child", sizes))
        peers = peer_trainers(child0, parent0, Path(tmp), sizes, batches[0])
        ours = hkt_trainers(child0, parent0, Path(tmp), sizes, batches[0])
        baseline = {BASELINE: hint_kd_trainer(child0, parent0, Path(tmp), sizes, batches[0])}
        trainers: dict[str, Trainer] = {"child": plain, **peers, **baseline, **ours}
        steps = {name: timing.trainer_step(trainer) for name, trainer in trainers.items()}
        chunked_step = steps["chunked"]
        steps["chunked"] = lambda batch: chunked_step(as_prompt_completion(batch))
        parents = {name: getattr(t, "teacher_model", None) or getattr(t, "parent_model", None)
                   for name, t in trainers.items()}
        phases = {name: lm_phases(t.model, parents[name]) if parents[name] is not None
                  else {"child forward": [t.model, t.model.model]} for name, t in trainers.items()}

        timing.progress(f"first step of each method, {timing.WARMUP_ROUNDS} warm-up rounds, saved-for-backward, "
                 f"then {sizes.repeats} timed rounds")
        errors = first_steps(steps, batches[0])
        timing.warm_up(steps, batches)
        params = timing.parameter_storages(*(t.model for t in trainers.values()), *filter(None, parents.values()))
        saved = {name: timing.saved_for_backward(step, batches[0], params, last_dim=sizes.vocab)
                 for name, step in steps.items()}
        times = timing.measure(steps, batches, sizes.repeats)
        timing.progress("phase breakdown" if sizes.phase_repeats else "no phase breakdown")
        breakdown = timing.phase_breakdown(steps, phases, batches, sizes.phase_repeats)

    step_s = {name: timing.median(t) for name, t in times.items()}
    result = timing.ratio_results(times, RATIO_PAIRS)
    hkt_saved = saved.get("hkt_lm_head")
    result["saved_mib_hkt_lm_over_peer"] = hkt_saved[0] / saved[PEER][0] if hkt_saved else None
    result.update({
        "step_s": step_s,
        "saved_mib": {name: b / timing.MIB for name, (b, _) in saved.items()},
        "saved_vocab_tensors": {name: n for name, (_, n) in saved.items()},
        "phases": breakdown,
        "errors": errors,
        "settings": {**asdict(sizes), "warmup_rounds": timing.WARMUP_ROUNDS, "threads": torch.get_num_threads(),
                     "precision": "fp32",
                     "memory": "saved-for-backward bytes per step, parameters excluded",
                     "data": "fixed-seed random tokens, every position trained on"},
    })
    return result


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    shape = f"batch {s['batch']} x seq {s['seq']} x vocab {s['vocab']:,}"
    rows = [
        f"Parent {s['parent_layers']} x {s['parent_hidden']}, child {s['child_layers']} x {s['child_hidden']}, "
        f"{shape}, fp32, {s['warmup_rounds']} warm-up rounds, {s['repeats']} timed interleaved rounds, {s['threads']} "
        "threads. Time ratios: median of the per-round ratios (middle half of the rounds, all rounds)."
        + (" A smoke run: its sizes are not the benchmark's, its ratios mean nothing." if s["mode"] == "smoke" else ""),
        "",
        "| method | step (s, median) | x GKD | saved-for-backward MiB | x GKD | vocab-sized tensors saved |",
        "|---|---|---|---|---|---|",
    ]
    peer_mib = result["saved_mib"][PEER]
    ratio_key = {name: key for key, name in RATIO_KEYS.items()}
    for name in METHODS:
        if name in result["errors"]:
            rows.append(f"| {name} | failed: {result['errors'][name]} | | | | |")
            continue
        t, mib = result["step_s"][name], result["saved_mib"][name]
        ratio = timing.spread_text(result["spread"][ratio_key[name]]) if name in ratio_key else "1"
        rows.append(f"| {name} | {t:.3f} | {ratio} | {mib:.1f} | {mib / peer_mib:.2f} | "
                    f"{result['saved_vocab_tensors'][name]} |")
    for key, (name, against) in RATIO_PAIRS.items():
        if against != PEER and result.get(key) is not None:
            rows += ["", f"`{name}` over `{against}` (paired per round): {timing.spread_text(result['spread'][key])}."]
    if "hkt_kd" in result["saved_mib"]:
        rows += ["", "With LM-head carriers (`hkt_lm_head`, and `hkt_kd`, whose carrier is the head's input too) the "
                 "child's own cross-entropy is computed from its head replayed on the head's input in chunks (checked "
                 "on the first batch to be the model's own loss), so, unlike the plain child's loss, it keeps no "
                 "[positions, vocabulary] log-probabilities for backward; the replayed heads keep their gradients "
                 "(computed in forward), and KD keeps only its gradient, one logits-sized tensor. The price is one "
                 "more head projection per step: the child's forward still computes its logits."]
    rows += timing.targets_section(
        result, TARGETS, "TRL's chunked projection and the rest of backward, loss terms, gates and Python are in the "
        "last column; TRL runs `chunked`'s whole loss, teacher backbone included, inside the student's forward "
        "(`_forward_redirection`), so there it all counts as child forward")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = timing.step_cost_parser(__doc__.split("\n\n")[0], "the full sizes and warm-up, fewer rounds",
                                     "tiny sizes, one round: checks that it runs (CI)")
    for field, value in asdict(FULL).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                            help=f"default {value} (quick: {getattr(MODES['quick'], field)}, "
                                 f"smoke: {getattr(MODES['smoke'], field)})")
    args = parser.parse_args(argv)
    mode = timing.mode_of(args)
    sizes = Sizes(**{f: getattr(args, f) if getattr(args, f) is not None else v
                     for f, v in asdict(MODES[mode]).items()})
    result = run(sizes, args.threads)
    result["settings"]["mode"] = mode
    timing.emit(result, "step_cost_lm.py", "Step cost, language model", report(result), args.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
