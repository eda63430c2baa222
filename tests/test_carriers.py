"""Carrier keywords: `blocks` pairs the child's repeated blocks with the parent's at the same relative depth."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import helpers as H
from hkt_hf import HKTTrainer
from hkt_hf.carriers import resolve_carriers
from hkt_hf.apps.models.cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification


def llama(layers: int, hidden: int = 16) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1))


def cifar_resnet(depth: int) -> CifarResNetForImageClassification:
    return CifarResNetForImageClassification(CifarResNetConfig(depth=depth, hidden_sizes=[4, 8, 16], num_labels=3))


def carriers(parent, child, *specs: str) -> list[str]:
    return [str(pair) for pair in resolve_carriers(list(specs), parent, child)]


def test_blocks_on_llamas_pair_every_child_layer_with_the_parent_layer_at_its_depth():
    assert carriers(llama(6), llama(2), "blocks") == ["model.layers.2=model.layers.0", "model.layers.5=model.layers.1"]
    assert carriers(llama(8), llama(8), "blocks") == [
        "model.layers.1=model.layers.1", "model.layers.4=model.layers.4", "model.layers.7=model.layers.7"]


def test_blocks_on_cifar_resnets_are_the_ends_of_the_three_stages():
    """ResNet-56 (9 blocks per stage) -> ResNet-20 (3 per stage): the outputs of `layer1`, `layer2`, `layer3`."""
    assert carriers(cifar_resnet(56), cifar_resnet(20), "blocks") == [
        "resnet.layer1.8=resnet.layer1.2", "resnet.layer2.8=resnet.layer2.2", "resnet.layer3.8=resnet.layer3.2"]


def test_blocks_take_the_repeated_class_and_combine_with_other_carriers():
    """ViT lists its embeddings in `_no_split_modules` too; only its layers are blocks. GPT-2's blocks are
    `transformer.h.*`; `auto` and `blocks` together give the head input plus the blocks."""
    assert carriers(H.tiny_vit(32, layers=4), H.tiny_vit(16, layers=2), "blocks") == [
        "vit.layers.1=vit.layers.0", "vit.layers.3=vit.layers.1"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2))
    assert carriers(gpt2, llama(1), "auto", "blocks") == ["lm_head:input=lm_head:input", "transformer.h.2=model.layers.0"]


def test_blocks_without_a_block_class_is_refused_with_what_to_do():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(ValueError, match=r"The child \(Plain\) lists no block classes in `_no_split_modules`.*"
                                         r"Name the carriers explicitly"):
        resolve_carriers(["blocks"], llama(2), Plain())


def test_a_causal_lm_trains_with_blocks_carriers(tmp_path):
    """The keyword needs no module names: a Llama child learns from a Llama parent through its decoder layers."""
    tokenizer = H.word_tokenizer()
    rows = [dict(tokenizer(t)) for t in H.sentiment_dataset(16, seed=3)["text"]]
    from transformers import DataCollatorForLanguageModeling

    parent, child = llama(4, 32), llama(2)
    parent.resize_token_embeddings(len(tokenizer))
    child.resize_token_embeddings(len(tokenizer))
    args = H.training_args(tmp_path, hkt_parent=None, hkt_carriers="blocks", per_device_train_batch_size=4, max_steps=2,
                           remove_unused_columns=False)
    trainer = HKTTrainer(child, args, parent_model=parent, train_dataset=rows,
                         data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    assert [str(c) for c in trainer.carriers] == ["model.layers.1=model.layers.0", "model.layers.3=model.layers.1"]
    with H.one_torch_thread():
        trainer.train()
    log = next(h for h in trainer.state.log_history if "hkt/loss_parent_head" in h)
    assert {"hkt/model.layers.1=model.layers.0/gate_mean", "hkt/model.layers.3=model.layers.1/gate_mean"} <= set(log)
    assert trainer.hkt_lineage["hkt_carriers"] == ["model.layers.1=model.layers.0", "model.layers.3=model.layers.1"]
