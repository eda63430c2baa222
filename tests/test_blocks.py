"""`blocks` carriers: each child block stack is paired with the parent's stack in the same place, block by relative
depth, never with a non-repeated module (embeddings), never out of depth order, never wrapping to the parent's last
block; where the stacks do not correspond the keyword is refused with what to do."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import (
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import helpers as H
from hkt_hf import HKTSeq2SeqTrainer, HKTSeq2SeqTrainingArguments
from hkt_hf.carriers import BlockStack, block_stacks, resolve_carriers
from hkt_hf.apps.models.cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification

VOCAB = 40


def llama(layers: int, hidden: int = 16) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))


def gpt2(layers: int, hidden: int = 16) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=2))


def t5(encoder: int, decoder: int | None = None, hidden: int = 16, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=encoder, num_decoder_layers=decoder,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def cifar_resnet(depth: int) -> CifarResNetForImageClassification:
    return CifarResNetForImageClassification(CifarResNetConfig(depth=depth, hidden_sizes=[4, 8, 16], num_labels=3))


# Model families by depth (transformer layers; for the CIFAR ResNet, blocks per stage: depth 6n + 2).
FAMILIES: dict[str, Callable[[int], nn.Module]] = {
    "vit": lambda n: H.tiny_vit(16, layers=n),
    "bert": lambda n: H.tiny_bert(16, vocab_size=VOCAB, layers=n),
    "llama": llama,
    "gpt2": gpt2,
    "t5": lambda n: t5(n, max(1, n - 1)),  # decoder one shallower than the encoder
    "cifar_resnet": lambda n: cifar_resnet(6 * n + 2),
}
DEPTHS = [1, 2, 3, 4]


def blocks(parent: nn.Module, child: nn.Module) -> list[str]:
    return [str(pair) for pair in resolve_carriers(["blocks"], parent, child)]


def place(stacks: list[BlockStack], name: str) -> tuple[int, int, int]:
    """(stack index, block index, blocks in that stack) of block `name`."""
    return next((s, stack.blocks.index(name), len(stack.blocks)) for s, stack in enumerate(stacks) if name in stack.blocks)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pairing_stays_in_its_stack_and_in_depth_order(family):
    """Over all parent and child depths 1..4 (child deeper than its parent too): each carrier joins blocks of the
    corresponding stacks; the parent block is the first one at least as deep as the child's (relative depth of
    its output), so the last child block takes the last parent block and the order never goes back."""
    make = FAMILIES[family]
    for p_depth, c_depth in itertools.product(DEPTHS, DEPTHS):
        parent, child = make(p_depth), make(c_depth)
        parent_stacks, child_stacks = block_stacks(parent), block_stacks(child)
        pairs = resolve_carriers(["blocks"], parent, child)
        assert {place(child_stacks, pair.child.module)[0] for pair in pairs} == set(range(len(child_stacks)))
        last_parent_of_stack: dict[int, int] = {}
        for pair in pairs:
            (ps, k, p), (cs, i, c) = place(parent_stacks, pair.parent.module), place(child_stacks, pair.child.module)
            assert ps == cs, (p_depth, c_depth, str(pair))
            assert k / p < (i + 1) / c <= (k + 1) / p, (p_depth, c_depth, str(pair))
            assert k >= last_parent_of_stack.get(cs, 0)
            last_parent_of_stack[cs] = k
        ends = {(parent_stacks[s].blocks[-1], stack.blocks[-1]) for s, stack in enumerate(child_stacks)}
        assert ends <= {(pair.parent.module, pair.child.module) for pair in pairs}


@pytest.mark.parametrize(("parent", "child", "expected"), [
    (lambda: H.tiny_vit(32, layers=4), lambda: H.tiny_vit(16, layers=1), ["vit.layers.3=vit.layers.0"]),
    (lambda: H.tiny_bert(32, VOCAB, layers=3), lambda: H.tiny_bert(16, VOCAB, layers=1),
     ["bert.encoder.layer.2=bert.encoder.layer.0"]),
    (lambda: llama(2), lambda: llama(4),
     ["model.layers.0=model.layers.0", "model.layers.0=model.layers.1", "model.layers.1=model.layers.3"]),
    (lambda: t5(3, 3), lambda: t5(2, 1), ["encoder.block.2=encoder.block.1", "decoder.block.2=decoder.block.0"]),
    (lambda: cifar_resnet(20), lambda: cifar_resnet(56),
     ["resnet.layer1.2=resnet.layer1.8", "resnet.layer2.2=resnet.layer2.8", "resnet.layer3.2=resnet.layer3.8"]),
], ids=["vit-1-layer-child", "bert-1-layer-child", "llama-child-deeper", "t5-encoder-decoder", "cifar-child-deeper"])
def test_the_faults_of_the_old_pairing_are_gone(parent, child, expected):
    """A 1-layer ViT/BERT child pairs its layer, not its embeddings; a deeper child never pairs its first block with
    the parent's last; T5's encoder pairs with the encoder and its decoder with the decoder."""
    assert blocks(parent(), child()) == expected


def test_embeddings_listed_in_no_split_modules_are_never_blocks():
    for model in (H.tiny_vit(16, layers=1), H.tiny_bert(16, VOCAB, layers=1)):
        assert "Embeddings" in " ".join(model._no_split_modules)
        names = [name for stack in block_stacks(model) for name in stack.blocks]
        assert len(names) == 1 and "embeddings" not in names[0]


@pytest.mark.parametrize(("parent", "child"), [(lambda: t5(2, 2), lambda: llama(2)),
                                               (lambda: llama(2), lambda: t5(2, 2))],
                         ids=["child-with-one-stack", "child-with-a-stack-the-parent-lacks"])
def test_stacks_without_a_counterpart_are_refused_with_what_to_do(parent, child):
    with pytest.raises(ValueError, match=r"`blocks` pairs each block stack of the child with the parent's stack.*"
                                         r"no stack-by-stack pairing exists\. Name the carriers explicitly, e\.g\. "
                                         r"hkt_carriers=\['\S+=\S+'\]"):
        resolve_carriers(["blocks"], parent(), child())


def test_a_model_whose_block_class_is_in_no_list_is_refused():
    class Single(nn.Module):
        _no_split_modules = ["Linear"]

        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"The child \(Single\) holds no `_no_split_modules` class \(\['Linear'\]\) in "
                                         r"a ModuleList or Sequential"):
        resolve_carriers(["blocks"], llama(2), Single())


def test_a_t5_child_trains_with_encoder_and_decoder_block_carriers(tmp_path):
    """The encoder carrier is mixed in the encoder (the decoder reads the mixed states), the decoder carrier in the
    decoder: both gates are logged after one step."""
    rows = [{"input_ids": [2 + (i + j) % 30 for j in range(6)] + [1], "attention_mask": [1] * 7,
             "labels": [2 + i % 30, 1]} for i in range(8)]
    child, parent = t5(2, 2, seed=1), t5(3, 3, hidden=32, seed=2)
    args = HKTSeq2SeqTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=1, logging_steps=1,
                                       per_device_train_batch_size=4, save_strategy="no", hkt_carriers=["blocks"])
    collator = DataCollatorForSeq2Seq(H.word_tokenizer(), model=child, label_pad_token_id=-100)
    trainer = HKTSeq2SeqTrainer(model=child, args=args, parent_model=parent, train_dataset=rows, data_collator=collator)
    carriers = ["encoder.block.2=encoder.block.1", "decoder.block.2=decoder.block.1"]
    assert [str(c) for c in trainer.carriers] == carriers
    with H.one_torch_thread():
        trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert all(0 < log[f"hkt/{carrier}/gate_mean"] < 1 for carrier in carriers)
