"""The CIFAR ResNet as a transformers model: outputs, configuration checks, sizes, Auto classes, pipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from hkt_hf import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel, cifar_image_processor
from hkt_hf.apps.models import CIFAR10_LABELS


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def model() -> CifarResNetForImageClassification:
    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(depth=20)).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, model) -> str:
    out = tmp_path_factory.mktemp("cifar-resnet-random")
    model.save_pretrained(out)
    cifar_image_processor().save_pretrained(out)
    return str(out)


def test_forward_returns_logits_per_class(model, pixels):
    out = model(pixel_values=pixels)
    assert isinstance(out, ImageClassifierOutputWithNoAttention)
    assert out.logits.shape == (4, 10)
    assert out.loss is None
    assert out.hidden_states is None
    assert torch.isfinite(out.logits).all()


def test_loss_is_cross_entropy_of_the_labels(model, pixels):
    labels = torch.tensor([0, 3, 9, 5])
    out = model(pixel_values=pixels, labels=labels)
    assert out.loss is not None and out.loss.ndim == 0
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_hidden_states_are_stem_and_three_stages(model, pixels):
    out = model(pixel_values=pixels, output_hidden_states=True)
    shapes = [tuple(h.shape) for h in out.hidden_states]
    assert shapes == [(4, 16, 32, 32), (4, 16, 32, 32), (4, 32, 16, 16), (4, 64, 8, 8)]
    # The head reads the global average of the last stage.
    torch.testing.assert_close(out.logits, model.classifier(out.hidden_states[-1].mean(dim=(2, 3))))


def test_return_dict_false_gives_tuples(model, pixels):
    labels = torch.tensor([1, 2, 3, 4])
    reference = model(pixel_values=pixels, labels=labels, output_hidden_states=True)

    logits_only = model(pixel_values=pixels, return_dict=False)
    assert isinstance(logits_only, tuple) and len(logits_only) == 1
    torch.testing.assert_close(logits_only[0], reference.logits)

    loss, logits, hidden = model(pixel_values=pixels, labels=labels, output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(loss, reference.loss)
    torch.testing.assert_close(logits, reference.logits)
    assert len(hidden) == 4

    backbone = model.resnet(pixels, return_dict=False)
    assert isinstance(backbone, tuple) and len(backbone) == 2
    assert backbone[0].shape == (4, 64, 8, 8) and backbone[1].shape == (4, 64)


@pytest.mark.parametrize("depth", [0, 7, 19, 21, 33])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNetConfig(depth=depth)


def test_hidden_sizes_must_name_three_stages():
    with pytest.raises(ValueError, match="exactly 3 stages"):
        CifarResNetConfig(hidden_sizes=[16, 32])


def test_default_labels_are_cifar10():
    config = CifarResNetConfig()
    assert config.num_labels == 10
    assert [config.id2label[i] for i in range(10)] == CIFAR10_LABELS
    assert CifarResNetConfig(num_labels=100).num_labels == 100


@pytest.mark.parametrize(
    ("depth", "expected"), [(8, 75_290), (20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)]
)
def test_parameter_counts_match_the_paper_models(depth, expected):
    config = CifarResNetConfig(depth=depth)
    model = CifarResNetForImageClassification(config)
    assert n_params(model) == expected
    assert sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d)) == depth - 1  # + the linear head
    assert len(model.resnet.layer1) == len(model.resnet.layer3) == config.blocks_per_stage == (depth - 2) // 6


def test_save_load_round_trip_through_auto_classes(model, pixels, saved_dir):
    config = AutoConfig.from_pretrained(saved_dir)
    assert isinstance(config, CifarResNetConfig)
    assert config.depth == 20 and config.hidden_sizes == [16, 32, 64]

    loaded = AutoModelForImageClassification.from_pretrained(saved_dir).eval()
    assert type(loaded) is CifarResNetForImageClassification
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)

    backbone = AutoModel.from_pretrained(saved_dir).eval()
    assert type(backbone) is CifarResNetModel
    with torch.no_grad():
        out = backbone(pixels)
        assert isinstance(out, BaseModelOutputWithPoolingAndNoAttention)
        assert torch.equal(out.pooler_output, model.resnet(pixels).pooler_output)


def test_save_load_keeps_batchnorm_statistics(tmp_path, pixels):
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(CifarResNetConfig(depth=8))
    model.train()
    with torch.no_grad():
        model(pixel_values=pixels * 3 + 1)  # moves the running statistics away from their initial 0/1
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.resnet.bn1.running_mean, model.resnet.bn1.running_mean)
    assert not torch.allclose(loaded.resnet.bn1.running_mean, torch.zeros(16))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_pipeline_classifies_a_pil_image(saved_dir, cifar_test_split):
    image = cifar_test_split[0]["img"]
    classifier = pipeline("image-classification", model=saved_dir, device="cpu")
    predictions = classifier(image, top_k=10)
    assert len(predictions) == 10
    assert sorted(p["label"] for p in predictions) == sorted(CIFAR10_LABELS)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def test_pipeline_on_imported_model_names_the_class(resnet20_dir, cifar_test_split):
    # Rows are sorted by label: the first rows are airplanes, the last ones trucks.
    classifier = pipeline("image-classification", model=str(resnet20_dir), device="cpu")
    rows = cifar_test_split.select([0, 1, 2, len(cifar_test_split) - 2, len(cifar_test_split) - 1])
    names = rows.features["label"].int2str(rows["label"])
    assert names == ["airplane"] * 3 + ["truck"] * 2
    predictions = classifier(list(rows["img"]))
    assert [p[0]["label"] for p in predictions] == names
