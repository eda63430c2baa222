"""Dense prediction: the pasted-objects segmentation data, mIoU, per-pixel KD, carrier replacement seen by SegFormer's
decoder, HKTTrainer on SegFormer with carriers at three depths (maps and tokens), and the example's --quick run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

from hkt_hf import HKTTrainer
from hkt_hf.apps.data.segmentation import make_pasted_segmentation, paste_scene, prepare_segmentation_dataset
from hkt_hf.extraction import FeatureExtractor, FeatureSpec
from hkt_hf.apps.metrics import confusion_matrix, evaluate_segmentation, iou_scores
from hkt_hf.losses import kd_loss
from hkt_hf.parent import frozen
from hkt_hf.transfer import Aligner

from helpers import import_example, training_args

NUM_CLASSES = 3
SIZE = 32
CARRIERS = [
    "segformer.stages.0=segformer.stages.0",
    "segformer.stages.1.blocks.1=segformer.stages.1.blocks.0",
    "decode_head.linear_fuse=decode_head.linear_fuse",
]


def solid_source(n: int = 12) -> Dataset:
    """Single-colour 8x8 images, colour = (40 + 60 * label, ...): a pasted square's pixels reveal its class."""
    labels = [i % NUM_CLASSES for i in range(n)]
    images = [Image.fromarray(np.full((8, 8, 3), 40 + 60 * y, dtype=np.uint8)) for y in labels]
    features = Features(img=ImageFeature(), label=ClassLabel(num_classes=NUM_CLASSES))
    return Dataset.from_dict({"img": images, "label": labels}, features=features)


def segformer(widths: list[int], depths: list[int], decoder: int, seed: int = 0) -> SegformerForSemanticSegmentation:
    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2, hidden_sizes=widths, depths=depths, num_attention_heads=[1, 2], sr_ratios=[2, 1],
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=decoder,
        num_labels=NUM_CLASSES + 1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, drop_path_rate=0.0,
    )
    return SegformerForSemanticSegmentation(config)


@pytest.fixture()
def scenes() -> Dataset:
    processor = SegformerImageProcessorPil(size={"height": SIZE, "width": SIZE})
    data = make_pasted_segmentation(solid_source(), 16, seed=3, size=SIZE, side_range=(8, 16))
    return prepare_segmentation_dataset(data, processor, train=True)


# ---- data --------------------------------------------------------------------------------------------------------


def test_pasted_scenes_are_reproducible_and_masks_match_the_pasted_classes():
    source = solid_source()
    a = make_pasted_segmentation(source, 6, seed=7, size=SIZE, side_range=(8, 16))
    b = make_pasted_segmentation(source, 3, seed=7, size=SIZE, side_range=(8, 16))
    c = make_pasted_segmentation(source, 3, seed=8, size=SIZE, side_range=(8, 16))
    arrays = lambda ds, col: [np.asarray(x) for x in ds[col]]  # noqa: E731
    for x, y in zip(arrays(a, "image")[:3] + arrays(a, "label")[:3], arrays(b, "image") + arrays(b, "label")):
        np.testing.assert_array_equal(x, y)  # scene i does not depend on the number of scenes
    assert any(not np.array_equal(x, y) for x, y in zip(arrays(a, "label")[:3], arrays(c, "label")))
    for image, mask in zip(arrays(a, "image"), arrays(a, "label")):
        assert mask.shape == (SIZE, SIZE) and image.shape == (SIZE, SIZE, 3)
        labels = set(np.unique(mask)) - {0}
        assert labels and labels <= {1, 2, 3} and (mask == 0).any()
        for k in labels:  # every pixel labelled k shows the solid colour of class k - 1
            assert (image[mask == k] == 40 + 60 * (k - 1)).all()


def test_paste_scene_later_objects_occlude_earlier_ones():
    rng = np.random.default_rng(0)
    big = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]
    _, mask = paste_scene(big, [4, 6], rng, size=16, side_range=(16, 16))
    assert (mask == 7).all()
    with pytest.raises(ValueError, match="side_range"):
        paste_scene(big, [0, 1], rng, size=16, side_range=(8, 20))


def test_prepared_scenes_give_pixel_values_and_full_resolution_labels(scenes):
    torch.manual_seed(0)
    batch = scenes[:4]
    torch.manual_seed(0)  # flips follow torch's global generator, which the Trainer seeds: same seed, same flips
    assert torch.equal(scenes[:4]["pixel_values"], batch["pixel_values"])
    assert not torch.equal(scenes[:16]["pixel_values"], scenes[:16]["pixel_values"])  # yet they are random
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE)
    assert batch["labels"].shape == (4, SIZE, SIZE) and batch["labels"].dtype == torch.int64
    assert set(batch["labels"].unique().tolist()) <= set(range(NUM_CLASSES + 1))


def test_mean_iou_matches_a_hand_computation():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.sum() == 7 and cm[0, 0] == 1 and cm[0, 1] == 1 and cm[2, 0] == 1 and cm[1, 2] == 1
    # IoU: class 0: 1 / (2 + 2 - 1), class 1: 2 / (3 + 3 - 2), class 2: 1 / (2 + 2 - 1)
    scores = iou_scores(cm)
    assert scores["mean_iou"] == pytest.approx(100 * (1 / 3 + 2 / 4 + 1 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(100 * 4 / 7)
    with pytest.raises(ValueError, match="Mask values"):
        confusion_matrix(pred, np.full_like(target, 5), 3)


def test_evaluate_segmentation_upsamples_quarter_resolution_logits_of_a_perfect_model_to_100():
    masks = [np.repeat(((np.arange(SIZE) // 8 + i) % 4)[None], SIZE, 0).astype(np.uint8) for i in range(4)]
    data = Dataset.from_dict({"image": [Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8))] * 4,
                              "label": [Image.fromarray(m) for m in masks]})
    data = prepare_segmentation_dataset(data, SegformerImageProcessorPil(size={"height": SIZE, "width": SIZE}), False)

    class Oracle(torch.nn.Module):
        """Returns, in order, one-hot logits of the true masks at 1/4 resolution (stripes 2 cells wide)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.next = iter(masks)

        def forward(self, pixel_values):
            labels = torch.as_tensor(next(self.next)[None, ::4, ::4], dtype=torch.long)
            return type("Out", (), {"logits": F.one_hot(labels, NUM_CLASSES + 1).permute(0, 3, 1, 2).float()})()

    scores = evaluate_segmentation(Oracle(), data, NUM_CLASSES + 1, batch_size=1)
    assert scores == {"mean_iou": 100.0, "pixel_accuracy": 100.0}


# ---- core pieces on dense features --------------------------------------------------------------------------------


def test_kd_loss_on_dense_logits_is_per_pixel_over_the_class_dimension():
    torch.manual_seed(0)
    child, parent, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), 2.0
    per_pixel = (F.softmax(parent / t, 1) * (F.log_softmax(parent / t, 1) - F.log_softmax(child / t, 1))).sum(1)
    assert kd_loss(child, parent, t).item() == pytest.approx(per_pixel.mean().item() * t**2, rel=1e-5)
    assert kd_loss(parent, parent, t).item() == pytest.approx(0.0, abs=1e-6)


def test_replaced_stage_output_reaches_segformers_decoder():
    """SegFormer's decoder takes stage outputs from transformers' persistent OutputRecorder hooks: a carrier's
    replacement must run before them, or the decoder would see the unmixed feature."""
    model = segformer([8, 16], [1, 1], 16).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    model(pixel_values=x)  # installs the recorder hooks
    seen = {}

    def record(module, args):
        seen["in"] = args[0]

    handle = model.decode_head.linear_projections[0].register_forward_pre_hook(record)
    try:
        with FeatureExtractor(model, [FeatureSpec("segformer.stages.0")], lambda i, f: torch.zeros_like(f)) as ext:
            model(pixel_values=x)
    finally:
        handle.remove()
    assert ext.features[0].abs().sum() > 0
    assert seen["in"].abs().sum() == 0


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


# ---- HKTTrainer on SegFormer --------------------------------------------------------------------------------------


def test_hkt_trainer_on_segformer_with_three_carriers_of_maps_and_tokens(tmp_path, scenes):
    parent = segformer([16, 32], [1, 2], 32, seed=1)
    child = segformer([8, 16], [1, 1], 16, seed=2)
    before = {k: v.clone() for k, v in child.state_dict().items()}
    with torch.no_grad():  # transformers installs its persistent output-recorder hooks on the first forward
        for model in (child, parent):
            model(pixel_values=scenes[:2]["pixel_values"])
    hooks_before = [hook_counts(child), hook_counts(parent)]
    args = training_args(tmp_path, hkt_carriers=CARRIERS, per_device_train_batch_size=8, max_steps=2,
                         remove_unused_columns=False, learning_rate=1e-3, hkt_kd_weight=0.5)
    trainer = HKTTrainer(child, args, train_dataset=scenes, parent_model=parent)
    trainer.train()

    adapter = trainer.hkt_adapter
    maps, tokens, fused = adapter.to_child
    assert isinstance(maps, Aligner) and isinstance(maps.proj, torch.nn.Conv2d)  # [16, 8, 8] -> [8, 8, 8]
    assert maps.src_shape == (16, SIZE // 4, SIZE // 4) and maps.dst_shape == (8, SIZE // 4, SIZE // 4)
    assert isinstance(tokens.proj, torch.nn.Linear) and tokens.src_shape == (16, 32) and tokens.dst_shape == (16, 16)
    assert isinstance(fused.proj, torch.nn.Conv2d) and fused.src_shape[0] == 32 and fused.dst_shape[0] == 16
    assert set(child.state_dict()) == set(before)
    assert hook_counts(child) == hooks_before[0] and hook_counts(parent) == hooks_before[1]  # only transformers' own
    assert not torch.equal(child.state_dict()["segformer.stages.0.patch_embeddings.proj.weight"],
                           before["segformer.stages.0.patch_embeddings.proj.weight"])
    log = next(entry for entry in trainer.state.log_history if "hkt/loss_parent_head" in entry)
    assert math.isfinite(log["hkt/loss_kd"]) and log["hkt/loss_kd"] > 0
    for carrier in CARRIERS:
        assert 0 < log[f"hkt/{carrier}/gate_mean"] < 1 and 0 < log[f"hkt/{carrier}/mix_weight_mean"] < 0.6


def test_gate_is_computed_per_spatial_position_for_segformer_maps(tmp_path, scenes):
    parent = segformer([16, 32], [1, 2], 32, seed=1)
    child = segformer([8, 16], [1, 1], 16, seed=2)
    trainer = HKTTrainer(child, training_args(tmp_path, hkt_carriers=CARRIERS, remove_unused_columns=False),
                         train_dataset=scenes, parent_model=parent)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    adapter = trainer.hkt_adapter
    child.train()
    with frozen(parent, "eval"):  # as the trainer runs each step
        result = trainer._objective(child, adapter, batch, trainer._native_loss)
    gates = list(result.gates.values())
    assert gates[0].gate.shape == (8, SIZE // 4, SIZE // 4)  # one gate per position of the stage-0 map
    assert gates[1].gate.shape == (8, 16)  # one per token of the stage-1 block
    assert gates[2].gate.shape == (8, SIZE // 4, SIZE // 4)
    result.loss.backward()
    assert child.segformer.stages[0].patch_embeddings.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in parent.parameters())


# ---- the example --------------------------------------------------------------------------------------------------


def test_segmentation_example_quick_run(tmp_path, monkeypatch, cifar_dir):
    example = import_example("segmentation", monkeypatch)
    out = tmp_path / "metrics.json"
    result = example.main(["--quick", "--images", str(cifar_dir), "--output_dir", str(tmp_path / "runs"), "--json", str(out)])
    assert [r["method"] for r in result["runs"]] == ["alone", "kd", "hkt"]
    for run in result["runs"]:
        assert 0 <= run["mean_iou"] <= 100 and 0 <= run["pixel_accuracy"] <= 100
    assert len(result["runs"][2]["gates"]) == 2 * len(example.CARRIERS)
    assert result["parent"]["params"] > result["child_params"]
    assert list((tmp_path / "runs").glob("parent-*/config.json"))
    assert out.is_file()
