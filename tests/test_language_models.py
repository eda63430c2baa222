"""HKT on language models: causal LMs (GPT-2, Llama, Qwen2) with head and decoder-layer carriers, dynamic padding,
padded gradient accumulation against the plain Trainer, statistics over real positions, pass counts, LoRA children."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainingArguments,
)

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.objective import HKTObjective, StepResult

VOCAB = len(H.word_tokenizer())
LAYER_CARRIERS = {"gpt2": "transformer.h.1=transformer.h.0", "llama": "model.layers.1=model.layers.0",
                  "qwen2": "model.layers.1=model.layers.0"}


def tiny_lm(kind: str, hidden: int, layers: int = 2, seed: int = 0):
    """A dropout-free causal LM over the helpers' word vocabulary (pad id 0)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2, n_positions=32, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3)
        return GPT2LMHeadModel(config)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                          bos_token_id=2, eos_token_id=3)
    return model_class(config)


@pytest.fixture(scope="module")
def lm_data():
    """Sentences of 4 to 10 tokens (so dynamically padded batches differ in length) and the causal-LM collator."""
    tokenizer = H.word_tokenizer()
    texts = H.sentiment_dataset(32, seed=3)["text"]
    encoded = [tokenizer(t) for t in texts]
    rows = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded]
    return rows, DataCollatorForLanguageModeling(tokenizer, mlm=False)


def hkt_lm_trainer(child, parent, tmp_path, lm_data, **overrides) -> HKTTrainer:
    rows, collator = lm_data
    values = dict(per_device_train_batch_size=4, max_steps=2, remove_unused_columns=False, learning_rate=1e-2)
    values.update(overrides)
    return HKTTrainer(model=child, args=H.training_args(tmp_path, hkt_parent=None, **values), parent_model=parent,
                      train_dataset=rows, eval_dataset=rows[:8], data_collator=collator)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_causal_lm_trains_evaluates_saves_and_generates(kind, tmp_path, lm_data):
    """Head (`auto`) and decoder-layer carriers, parent 32 wide, child 16 wide, batches padded to their own length."""
    child, parent = tiny_lm(kind, 16, seed=1), tiny_lm(kind, 32, seed=2)
    before = {k: v.clone() for k, v in child.state_dict().items()}
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_carriers=["auto", LAYER_CARRIERS[kind]],
                             hkt_kd_weight=0.5, max_steps=3)
    head = next(name for name, module in child.named_modules() if module is child.get_output_embeddings())
    assert str(trainer.carriers[0]) == f"{head}:input={head}:input"
    with H.one_torch_thread():
        trainer.train()
        metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    log = next(h for h in trainer.state.log_history if "hkt/loss_parent_head" in h)
    assert all(math.isfinite(log[f"hkt/loss_{n}"]) for n in ("native", "child_mixed", "parent_head", "kd"))
    assert any(not torch.equal(before[k], v) for k, v in child.state_dict().items())
    trainer.save_model(str(tmp_path / "child"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "child")
    assert type(loaded) is type(child) and set(loaded.state_dict()) == set(before)
    out = loaded.generate(torch.tensor([[2, 4, 5]]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_auto_carrier_on_causal_lms_is_the_lm_head_input_and_replays_heads(tmp_path, lm_data):
    child, parent = tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, seed=2)
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data)
    assert [str(c) for c in trainer.carriers] == ["lm_head:input=lm_head:input"]
    assert trainer._objective.replay


# ---- padded gradient accumulation against the plain Trainer ----------------------------------------------------------


def one_update(trainer_class, tmp_path, lm_data, batch: int, accumulation: int, **hkt) -> dict[str, torch.Tensor]:
    """The child's parameters after one SGD step over the same 4 sequences, as `batch` x `accumulation`."""
    rows, collator = lm_data
    child = tiny_lm("llama", 16, seed=1)
    common = dict(output_dir=str(tmp_path / f"{trainer_class.__name__}-{batch}"), use_cpu=True, report_to="none",
                  disable_tqdm=True, seed=0, save_strategy="no", per_device_train_batch_size=batch,
                  gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                  remove_unused_columns=False, lr_scheduler_type="constant", logging_steps=1)
    if trainer_class is HKTTrainer:
        args = H.training_args(hkt_parent=None, **common, **hkt)
        trainer = HKTTrainer(model=child, args=args, parent_model=tiny_lm("llama", 32, seed=2),
                             train_dataset=rows[:4], data_collator=collator)
    else:
        trainer = Trainer(model=child, args=TrainingArguments(**common), train_dataset=rows[:4], data_collator=collator)
    with H.one_torch_thread():
        trainer.train()
    return {k: v.detach().clone() for k, v in child.state_dict().items()}


def assert_same_update(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> None:
    for key in start:
        da, db = a[key] - start[key], b[key] - start[key]
        torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-4 * db.abs().max().item() + 1e-7, msg=key)


@pytest.mark.parametrize(("trainer_class", "carriers", "hint"),
                         [(Trainer, None, 0.0), (HKTTrainer, ["auto", LAYER_CARRIERS["llama"]], 0.0),
                          (HKTTrainer, ["auto"], 0.0), (HKTTrainer, [LAYER_CARRIERS["llama"]], 0.5)],
                         ids=["plain", "hkt", "hkt-head", "hkt-hint"])
def test_padded_accumulation_gives_the_update_of_one_big_batch(trainer_class, carriers, hint, tmp_path, lm_data):
    """Batch 4 x accumulation 1 and batch 2 x accumulation 2 over padded sequences of different lengths: the plain
    Trainer (the reference) and HKTTrainer (head and layer carriers, KD; the head carrier alone, whose native term is
    replayed from the head in chunks; the hint term) all give the same update."""
    start = tiny_lm("llama", 16, seed=1).state_dict()
    hkt = dict(hkt_carriers=carriers, hkt_kd_weight=0.5, hkt_hint_weight=hint) if trainer_class is HKTTrainer else {}
    big = one_update(trainer_class, tmp_path, lm_data, 4, 1, **hkt)
    small = one_update(trainer_class, tmp_path, lm_data, 2, 2, **hkt)
    assert any(not torch.equal(big[k], start[k]) for k in start)
    assert_same_update(small, big, start)


def test_hkt_with_only_the_native_term_equals_the_plain_trainer(tmp_path, lm_data):
    start = tiny_lm("llama", 16, seed=1).state_dict()
    plain = one_update(Trainer, tmp_path, lm_data, 2, 2)
    hkt = one_update(HKTTrainer, tmp_path, lm_data, 2, 2, hkt_loss_weights=[1.0, 0.0, 0.0])
    assert_same_update(hkt, plain, start)


def objective_on(trainer: HKTTrainer, batch: dict, native_replay: bool) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                              list[tuple[int, ...]]]:
    """One objective call with the native term replayed from the head or the model's own: the loss, the child's
    gradients and the shapes of the tensors autograd saved for backward (weights and their views left out)."""
    child = trainer.model
    child.train()
    child.zero_grad()
    trainer._objective.native_replay = native_replay
    weights = {p.untyped_storage().data_ptr() for p in [*child.parameters(), *trainer.parent_model.parameters()]}
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = trainer._objective(child, trainer.hkt_adapter, batch, lambda b: trainer._native_loss(b, 7), 7)
    result.loss.backward()
    return result.loss.detach(), [p.grad.clone() for p in child.parameters() if p.grad is not None], saved


def test_the_native_term_replayed_from_the_head_is_the_models_own_loss_without_vocabulary_tensors(tmp_path, lm_data):
    """With the LM heads' inputs as carriers, the native term comes from the child's head replayed on its input in
    chunks: the same loss (here normalised by a `num_items_in_batch` of 7) and gradients as the model's own loss,
    and no [positions, vocabulary] tensor kept for backward, where the model's own loss keeps its log-softmax."""
    rows, collator = lm_data
    trainer = hkt_lm_trainer(tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, seed=2), tmp_path, lm_data)
    batch = collator(rows[:4])
    assert trainer._objective.native_replay
    replayed = objective_on(trainer, batch, native_replay=True)
    own = objective_on(trainer, batch, native_replay=False)
    torch.testing.assert_close(replayed[0], own[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(replayed[1], own[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    vocabulary_sized = [[s for s in saved if len(s) >= 2 and s[-1] == VOCAB] for saved in (replayed[2], own[2])]
    assert vocabulary_sized[0] == [] and vocabulary_sized[1]


@pytest.mark.parametrize("setting", ["label_smoothing", "two_carriers"])
def test_the_models_own_loss_stays_the_native_term_where_replaying_would_change_it(setting, tmp_path, lm_data):
    overrides = dict(label_smoothing_factor=0.1) if setting == "label_smoothing" else dict(
        hkt_carriers=["auto", LAYER_CARRIERS["llama"]])
    trainer = hkt_lm_trainer(tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, seed=2), tmp_path, lm_data,
                             **overrides)
    assert not trainer._objective.native_replay


# ---- real positions --------------------------------------------------------------------------------------------------


def padded_objective(trainer: HKTTrainer, lm_data) -> tuple[dict, torch.Tensor, StepResult]:
    """One objective call in training mode on a padded batch of four sentences: the batch, its real positions and
    the result."""
    rows, collator = lm_data
    batch = collator([rows[i] for i in (0, 5, 9, 13)])
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch is padded
    trainer.model.train()
    return batch, mask, trainer._objective(trainer.model, trainer.hkt_adapter, batch, trainer._native_loss)


def test_gate_statistics_and_kd_use_real_positions_only(tmp_path, lm_data):
    """Recomputed by hand on a padded batch: the gate mean over attention-mask positions, no mixing at padding, and
    KD over the positions with a (shifted) label."""
    child, parent = tiny_lm("llama", 16, seed=1), tiny_lm("llama", 16, layers=3, seed=2)
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_kd_weight=1.0, hkt_kd_temperature=2.0)
    batch, mask, result = padded_objective(trainer, lm_data)

    captured = {}
    hooks = [m.lm_head.register_forward_pre_hook(lambda mod, args, key=key: captured.__setitem__(key, args[0]))
             for key, m in (("q", child), ("p", parent))]
    with torch.no_grad():
        child_logits = child(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        parent_logits = parent(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for hook in hooks:
        hook.remove()
    q, p = captured["q"], captured["p"]
    a = torch.sigmoid((q * p).sum(-1) / math.sqrt(q.shape[-1]))
    name = "lm_head:input=lm_head:input"
    assert result.stats[f"hkt/{name}/gate_mean"] == pytest.approx(a[mask].mean().item(), rel=1e-5)
    assert result.stats[f"hkt/{name}/mix_weight_mean"] == pytest.approx((0.6 * (1 - a[mask])).mean().item(), rel=1e-5)
    assert (result.gates[name].weight[~mask] == 0).all()

    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).ne(-100)
    log_c, log_p = (child_logits[targets] / 2).log_softmax(-1), (parent_logits[targets] / 2).log_softmax(-1)
    kd = (log_p.exp() * (log_p - log_c)).sum(-1).mean() * 4
    assert result.parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)


# ---- passes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("carriers", "weights", "kd", "expected"),
    [
        (["auto"], [1, 1, 1], 0.5, (1, 1)),  # head replay: one parent pass serves KD and the HKT terms
        ([LAYER_CARRIERS["llama"]], [1, 0, 0], 0.5, (1, 1)),  # KD only: no second child pass
        ([LAYER_CARRIERS["llama"]], [1, 1, 1], 0.0, (1, 2)),  # parent downstream of m; second child pass
        ([LAYER_CARRIERS["llama"]], [1, 1, 0], 0.0, (1, 2)),  # no parent-head term: a plain parent pass
        ([LAYER_CARRIERS["llama"]], [1, 0, 1], 0.0, (1, 1)),  # no child-mixed term: no second child pass
        ([LAYER_CARRIERS["llama"]], [1, 1, 1], 0.5, (2, 2)),  # KD needs the plain parent beside the mixed one
    ],
    ids=["replay+kd", "kd-only", "layers", "no-parent-head", "no-child-mixed", "layers+kd"],
)
def test_forward_passes_per_step(tmp_path, lm_data, carriers, weights, kd, expected):
    rows, collator = lm_data
    child, parent = tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, seed=2)
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_carriers=carriers, hkt_loss_weights=weights,
                             hkt_kd_weight=kd)
    batch = collator(rows[:4])
    adapter = trainer.hkt_adapter
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda *_, role=role: order.append(role))
             for role, m in (("parent", parent), ("child", child))]
    child.train()
    try:
        result = trainer._objective(child, adapter, batch, trainer._native_loss)
    finally:
        for hook in hooks:
            hook.remove()
    assert (order.count("parent"), order.count("child")) == expected
    if "parent" in order and (kd > 0 or carriers == ["auto"] or weights[2] == 0):
        assert order[0] == "parent"  # the plain parent pass, without autograd, runs before the child's
    assert set(result.parts) == {"native"} | {n for n, w in zip(("child_mixed", "parent_head"), weights[1:]) if w} | (
        {"kd"} if kd else set())
    result.loss.backward()


# ---- the hint term ---------------------------------------------------------------------------------------------------


def carrier_outputs(model, layer: int, batch: dict) -> torch.Tensor:
    """The output of decoder layer `layer` on `batch`, captured by a hook."""
    captured = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda mod, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hook.remove()
    return captured[0]


def test_the_hint_term_is_the_mse_of_the_mapped_child_feature_over_the_items(tmp_path, lm_data):
    """FitNets' hint at a decoder-layer carrier (child 16 wide, parent 32): MSE between the child's feature through the
    carrier's child -> parent aligner and the parent's, over the items only (the positions with a target, as KD); its
    gradient trains that aligner and the child, and it enters the loss at its weight."""
    child, parent = tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, layers=3, seed=2)
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_carriers=[LAYER_CARRIERS["llama"]],
                             hkt_loss_weights=[1.0, 0.0, 0.0], hkt_hint_weight=0.5)
    batch, _, result = padded_objective(trainer, lm_data)
    adapter = trainer.hkt_adapter
    assert set(result.parts) == {"native", "hint"}

    q, p = carrier_outputs(child, 0, batch), carrier_outputs(parent, 1, batch)
    error = (adapter.to_parent[0](q) - p).pow(2).mean(-1)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).ne(-100)  # the items: positions with a next token
    assert result.parts["hint"].item() == pytest.approx(error[targets].mean().item(), rel=1e-5)
    assert error.mean().item() != pytest.approx(error[targets].mean().item(), rel=1e-4)  # padding would change it
    torch.testing.assert_close(result.loss, result.parts["native"] + 0.5 * result.parts["hint"])
    result.loss.backward()
    assert adapter.to_parent[0].proj.weight.grad.abs().sum() > 0
    assert child.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_the_hint_weight_is_validated_and_may_train_alone(tmp_path):
    with pytest.raises(ValueError, match=r"hkt_hint_weight must be >= 0"):
        H.training_args(tmp_path, hkt_hint_weight=-1.0)
    with pytest.raises(ValueError, match=r"hkt_hint_weight must be a finite number"):
        H.training_args(tmp_path, hkt_hint_weight=float("nan"))
    args = H.training_args(tmp_path, hkt_loss_weights=[0.0, 0.0, 0.0], hkt_hint_weight=1.0)
    assert args.objective_settings().hint_weight == 1.0
    with pytest.raises(ValueError, match=r"allowed only with hkt_kd_weight > 0 or hkt_hint_weight > 0"):
        H.training_args(tmp_path, hkt_loss_weights=[0.0, 0.0, 0.0])


def test_objective_takes_the_training_arguments(tmp_path, lm_data):
    child, parent = tiny_lm("llama", 16, seed=1), tiny_lm("llama", 32, seed=2)
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_loss_weights=[1, 0.5, 0.25])
    assert isinstance(trainer._objective, HKTObjective) and trainer._objective.weights == (1.0, 0.5, 0.25)


# ---- LoRA children ---------------------------------------------------------------------------------------------------


def test_lora_child_takes_carriers_by_base_model_names(tmp_path, lm_data):
    from peft import LoraConfig, get_peft_model

    child = get_peft_model(tiny_lm("llama", 16, seed=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    parent = tiny_lm("llama", 32, seed=2)
    lora_before = {k: v.clone() for k, v in child.named_parameters() if "lora_B" in k}
    base_before = child.get_base_model().model.embed_tokens.weight.clone()
    trainer = hkt_lm_trainer(child, parent, tmp_path, lm_data, hkt_carriers=["auto", LAYER_CARRIERS["llama"]],
                             max_steps=2)
    assert [str(c) for c in trainer.carriers] == ["lm_head:input=lm_head:input", LAYER_CARRIERS["llama"]]
    with H.one_torch_thread():
        trainer.train()
    assert any(not torch.equal(v, dict(child.named_parameters())[k]) for k, v in lora_before.items())
    assert torch.equal(child.get_base_model().model.embed_tokens.weight, base_before)
    log = next(h for h in trainer.state.log_history if "hkt/loss_parent_head" in h)
    assert f"hkt/{LAYER_CARRIERS['llama']}/gate_mean" in log


@pytest.mark.parametrize("head_kind", ["linear", "linear-bias", "frozen-linear", "other"])
def test_chunked_lm_head_loss_equals_unchunked(head_kind):
    """The replayed LM head in chunks of positions gives the loss and gradients of one go, and keeps no
    vocabulary-sized tensor for backward: a plain linear head through `SummedLinearCrossEntropy` (gradients computed
    in forward), any other head under activation checkpointing."""
    from hkt_hf.losses import token_loss

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, VOCAB, bias=head_kind == "linear-bias")
    head = torch.nn.Sequential(linear) if head_kind == "other" else linear
    linear.weight.requires_grad_(head_kind != "frozen-linear")
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 9))
    targets[0, 5:] = -100
    wrt = [t for t in (hidden, linear.weight, linear.bias) if t is not None and t.requires_grad]
    expected = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, wrt)
    for chunk in (1, 4, 1024):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = token_loss(head, hidden, targets, chunk=chunk)
        assert not [t.shape for t in saved if t.ndim >= 2 and t.shape[-1] == VOCAB]  # no [positions, vocabulary]
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for g, e in zip(torch.autograd.grad(loss, wrt), expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("chunk", [2, 1024])
def test_kd_keeps_only_its_gradient_and_equals_autograd_kl(temperature, chunk):
    """KD over vocabulary-sized logits: the value and gradient of plain autograd's T^2 * KL, with one tensor of the
    logits' size kept for backward (autograd's version keeps both fp32 log-softmaxes and its KL terms)."""
    from hkt_hf.losses import SummedKL

    torch.manual_seed(0)
    child = torch.randn(7, VOCAB, requires_grad=True)
    parent = torch.randn(7, VOCAB)
    c, p = F.log_softmax(child / temperature, -1), F.log_softmax(parent / temperature, -1)
    expected = F.kl_div(c, p, reduction="sum", log_target=True) * temperature**2
    (expected_grad,) = torch.autograd.grad(2 * expected, child)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        total = SummedKL.apply(child, parent, temperature, chunk)
    assert [tuple(t.shape) for t in saved] == [(7, VOCAB)]
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(2 * total, child)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


# ---- parent dtype ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("carriers", [["auto"], [LAYER_CARRIERS["llama"]]], ids=["lm-head", "layers"])
def test_a_bf16_parent_teaches_an_fp32_child(carriers, tmp_path, lm_data):
    """`hkt_parent_init_kwargs={"dtype": "bfloat16"}` halves the parent's memory: its features enter the fp32 aligners
    and the mixture goes back into it in bf16, so the parent is never cast and the child trains in fp32."""
    tiny_lm("llama", 32, seed=2).save_pretrained(tmp_path / "parent")
    child = tiny_lm("llama", 16, seed=1)
    before = {k: v.clone() for k, v in child.named_parameters()}
    rows, collator = lm_data
    args = H.training_args(tmp_path / "out", hkt_parent=str(tmp_path / "parent"), hkt_carriers=carriers,
                           hkt_parent_init_kwargs={"dtype": "bfloat16"}, per_device_train_batch_size=4, max_steps=2,
                           remove_unused_columns=False, learning_rate=1e-2, hkt_kd_weight=0.5)
    trainer = HKTTrainer(model=child, args=args, train_dataset=rows, data_collator=collator)
    assert {p.dtype for p in trainer.parent_model.parameters()} == {torch.bfloat16}
    with H.one_torch_thread():
        trainer.train()
    assert {p.dtype for p in trainer.parent_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in child.parameters()} == {torch.float32}
    assert all(not torch.equal(v, dict(child.named_parameters())[k]) for k, v in before.items() if "embed" in k)
    log = next(h for h in trainer.state.log_history if "hkt/loss_parent_head" in h)
    assert all(math.isfinite(log[f"hkt/loss_{part}"]) for part in ("native", "child_mixed", "parent_head", "kd"))
