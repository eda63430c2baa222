"""Builders shared by the HKT trainer tests: tiny transformers models from configs, small synthetic datasets, an
offline word-level tokenizer, training arguments for fast CPU runs, hook / adapter inspection, and a `torchrun`
launcher for the multi-process tests.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    EvalPrediction,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ResNetForImageClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)

from hkt_hf import HKTTrainingArguments

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # full data beside the repository (development setup)
NEEDS_SHARED = f"needs the full CIFAR-10 data and checkpoints in ../shared ({SHARED}), absent here"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=NEEDS_SHARED)
NUM_LABELS = 3
IMAGE_SIZE = 16


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while the block runs: on a busy shared CPU, tiny models with two OpenMP threads spend most
    of their time spin-waiting (a 5x slower test file was measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_vit(hidden: int, layers: int = 1, num_labels: int = NUM_LABELS, seed: int = 0,
             image_size: int = IMAGE_SIZE) -> ViTForImageClassification:
    """A ViT on 4x4 patches (16 tokens) without dropout, so training steps are deterministic."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=image_size // 4, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def tiny_resnet(width: int, num_labels: int = NUM_LABELS, seed: int = 0) -> ResNetForImageClassification:
    """A transformers ResNet with two basic-block stages; its head input is a pooled [C, 1, 1] map."""
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3, embedding_size=width, hidden_sizes=[width, 2 * width], depths=[1, 1], layer_type="basic",
        num_labels=num_labels,
    )
    return ResNetForImageClassification(config)


def tiny_convnext(width: int, num_labels: int = NUM_LABELS, seed: int = 0) -> ConvNextForImageClassification:
    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_channels=3, patch_size=2, hidden_sizes=[width, 2 * width], depths=[1, 1], num_stages=2,
        num_labels=num_labels,
    )
    return ConvNextForImageClassification(config)


def tiny_mobilenet_v2(
    depth_multiplier: float, num_labels: int = NUM_LABELS, seed: int = 0
) -> MobileNetV2ForImageClassification:
    torch.manual_seed(seed)
    config = MobileNetV2Config(
        num_channels=3, image_size=IMAGE_SIZE, depth_multiplier=depth_multiplier, min_depth=4, finegrained_output=False,
        classifier_dropout_prob=0.0, num_labels=num_labels,
    )
    return MobileNetV2ForImageClassification(config)


def tiny_bert(hidden: int, vocab_size: int, layers: int = 1, num_labels: int = 2, seed: int = 0,
              dropout: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def image_dataset(n: int, num_labels: int = NUM_LABELS, seed: int = 0, size: int = IMAGE_SIZE) -> Dataset:
    """`pixel_values` whose mean brightness encodes the label (a learnable task), plus `labels`."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_labels
    pixels = rng.normal(size=(n, 3, size, size)).astype(np.float32) * 0.5 + labels[:, None, None, None]
    return Dataset.from_dict({"pixel_values": list(pixels), "labels": labels.tolist()}).with_format("torch")


def color_image_dataset(n: int, num_labels: int = NUM_LABELS, seed: int = 0, size: int = IMAGE_SIZE) -> Dataset:
    """PIL images in the Hub's `img` / `label` layout whose dominant colour channel is the label (learnable)."""
    from datasets import ClassLabel, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % num_labels
        pixels = rng.integers(0, 96, size=(size, size, 3))
        pixels[..., label % 3] += 128 + 32 * (label // 3)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        labels.append(label)
    features = Features(img=ImageFeature(), label=ClassLabel(names=[f"class_{i}" for i in range(num_labels)]))
    return Dataset.from_dict({"img": images, "label": labels}, features=features)


POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "sad"]
NEUTRAL = ["the", "movie", "was", "a", "plot", "film", "very", "quite", "and", "story"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the synthetic sentiment vocabulary, built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + POSITIVE + NEGATIVE + NEUTRAL)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def sentiment_dataset(n: int, seed: int = 0) -> Dataset:
    """Sentences of neutral words with one or two sentiment words; label 1 = positive."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(NEUTRAL, size=rng.integers(3, 7)))
        for _ in range(rng.integers(1, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


def training_args(output_dir: Path | str, **overrides: Any) -> HKTTrainingArguments:
    """Arguments for short deterministic CPU runs without reporting, progress bars or checkpoints by default."""
    values: dict[str, Any] = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, save_strategy="no", per_device_train_batch_size=8, per_device_eval_batch_size=16,
        num_train_epochs=1, learning_rate=1e-2, logging_steps=1,
    )
    values.update(overrides)
    return HKTTrainingArguments(**values)


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for classification: top-1 accuracy."""
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules that carry any forward hook or forward pre-hook."""
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]


class AdapterAtTrainBegin(TrainerCallback):
    """Snapshots the HKT adapter's parameters when training begins (after the optimizer is made)."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.hkt_adapter.named_parameters()}

    def unchanged(self, adapter: nn.Module) -> list[str]:
        """The adapter parameters that training left as they were at its start."""
        return [name for name, p in adapter.named_parameters() if torch.equal(p, self.before[name])]


class ForwardCounter:
    """Counts forward calls of a module through a hook that the test removes itself with `remove()`."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def train_between_child_only_evaluations(trainer, parent: nn.Module, test_dataset) -> tuple[dict, dict, Any]:
    """evaluate, train, evaluate, predict; asserts that the parent runs during training only.

    Returns the metrics before and after training and the prediction output.
    """
    counter = ForwardCounter(parent)
    try:
        before = trainer.evaluate()
        assert counter.calls == 0
        trainer.train()
        assert counter.calls > 0
        counter.calls = 0
        after = trainer.evaluate()
        prediction = trainer.predict(test_dataset)
        assert counter.calls == 0
    finally:
        counter.remove()
    return before, after, prediction


@contextmanager
def torchrun_in_background(worker: Path, out: Path, *args: str, timeout: float = 240) -> Iterator[None]:
    """Run `torchrun --standalone --nproc_per_node 2 WORKER OUT ARGS...` while the block runs (the tests run their
    1-process reference there), then wait for it: an AssertionError with the end of its log if it fails or is not
    done `timeout` seconds after the block. `--standalone` lets torchrun pick a free port itself, so several launches
    may run at once. OUT's folder is created; the workers write their results under it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               str(out), *args]
    # A session of its own, so that a failure ends torchrun together with its workers.
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)

    def kill() -> str:
        os.killpg(launch.pid, signal.SIGKILL)
        return launch.communicate()[0]

    try:
        yield
    except BaseException:
        kill()
        raise
    try:
        log, _ = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun {' '.join(args)} did not finish within {timeout} s:\n{kill()[-4000:]}")
    assert launch.returncode == 0, f"torchrun {' '.join(args)} failed (exit {launch.returncode}):\n{log[-6000:]}"


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def import_example(name: str, monkeypatch) -> ModuleType:
    """`examples/<name>.py` as a module, with `examples/` on `sys.path` as when it runs as a script (the dense examples
    import `examples/comparison.py`), so a test can call its `main(argv)` in-process."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example
