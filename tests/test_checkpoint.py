"""Importing the reference CIFAR ResNet checkpoints: structure, weights, file errors, and accuracy on real data."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint, infer_depth, load_reference_state_dict
from hkt_hf.apps.data.images import load_image_dataset, prepare_image_dataset, strided_subset
from hkt_hf.apps.metrics import top1_accuracy
from hkt_hf.apps.models import IMAGENET_MEAN, IMAGENET_STD, CifarResNetForImageClassification


class NotATensor:
    """Pickled into a checkpoint to check that the safe loader refuses arbitrary objects."""


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet20(resnet20_dir) -> CifarResNetForImageClassification:
    return AutoModelForImageClassification.from_pretrained(resnet20_dir).eval()


def _prepared(parquet, resnet20_dir):
    """A test split with the processor saved by `import_checkpoint`, no augmentation.

    Loaded afresh: `prepare_image_dataset` sets a transform in place, which must not leak into the shared
    session fixture `cifar_test_split`.
    """
    processor = AutoImageProcessor.from_pretrained(resnet20_dir)
    return prepare_image_dataset(load_image_dataset(str(parquet)), processor, train_split=None)["test"]


@pytest.fixture(scope="module")
def prepared_test_split(cifar_test_parquet, resnet20_dir):
    """The fixture test split (1,000 real images, 100 per label)."""
    return _prepared(cifar_test_parquet, resnet20_dir)


@pytest.fixture(scope="module")
def full_prepared_test_split(full_cifar_test_parquet, resnet20_dir):
    """The full real test split (10,000 images) of ../shared."""
    return _prepared(full_cifar_test_parquet, resnet20_dir)


def test_imported_resnet20_structure(resnet20):
    assert type(resnet20) is CifarResNetForImageClassification
    assert resnet20.config.depth == 20
    assert n_params(resnet20) == 269_722
    assert resnet20.config.id2label[0] == "airplane" and resnet20.config.id2label[9] == "truck"


def test_imported_weights_are_the_reference_tensors(resnet20, checkpoint_path):
    reference = load_reference_state_dict(checkpoint_path("resnet20"))
    assert not any(k.startswith("module.") for k in reference)
    assert infer_depth(reference) == 20
    imported = resnet20.state_dict()
    assert torch.equal(imported["classifier.weight"], reference["linear.weight"])
    assert torch.equal(imported["resnet.conv1.weight"], reference["conv1.weight"])
    assert torch.equal(imported["resnet.layer3.2.bn2.running_var"], reference["layer3.2.bn2.running_var"])
    n_reference = sum(v.numel() for k, v in reference.items() if "running" not in k and "num_batches" not in k)
    assert n_reference == n_params(resnet20)


def test_imported_folder_holds_model_config_and_processor(resnet20_dir):
    names = {p.name for p in resnet20_dir.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= names
    processor = AutoImageProcessor.from_pretrained(resnet20_dir)
    assert list(processor.image_mean) == pytest.approx(IMAGENET_MEAN)
    assert list(processor.image_std) == pytest.approx(IMAGENET_STD)


def test_import_resnet56_without_saving(checkpoint_path):
    model = import_checkpoint(checkpoint_path("resnet56"))
    assert model.config.depth == 56
    assert n_params(model) == 853_018
    assert not model.training


def test_import_hkt_resnet20(checkpoint_path, tmp_path, resnet20):
    model = import_checkpoint(checkpoint_path("hkt-resnet20"), tmp_path / "hkt")
    assert model.config.depth == 20
    assert n_params(model) == 269_722
    assert (tmp_path / "hkt" / "model.safetensors").is_file()
    # A different network from the public ResNet-20, not a copy of it.
    assert not torch.equal(model.classifier.weight, resnet20.classifier.weight)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        import_checkpoint(tmp_path / "nope.th")


def test_truncated_checkpoint_raises_value_error(checkpoint_path, tmp_path):
    data = checkpoint_path("resnet20").read_bytes()
    broken = tmp_path / "truncated.th"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Could not read checkpoint .*truncated.th"):
        import_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_random_bytes_raise_value_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="Could not read checkpoint .*junk.pth"):
        import_checkpoint(junk)


def test_pickled_objects_need_allow_pickle(checkpoint_path, tmp_path):
    blob = torch.load(checkpoint_path("resnet20"), map_location="cpu", weights_only=True)
    blob["extra"] = NotATensor()
    path = tmp_path / "with-object.th"
    torch.save(blob, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        import_checkpoint(path)
    assert import_checkpoint(path, allow_pickle=True).config.depth == 20


def test_wrong_content_is_reported(checkpoint_path, tmp_path):
    not_tensors = tmp_path / "not-tensors.th"
    torch.save({"state_dict": {"epoch": 3}}, not_tensors)
    with pytest.raises(ValueError, match="not a reference CIFAR ResNet checkpoint"):
        import_checkpoint(not_tensors)

    state = load_reference_state_dict(checkpoint_path("resnet20"))
    del state["layer2.1.conv2.weight"]
    missing_key = tmp_path / "missing-key.th"
    torch.save({"state_dict": state}, missing_key)
    with pytest.raises(ValueError, match="missing .*layer2.1.conv2.weight"):
        import_checkpoint(missing_key)


def _independent_predictions(model: torch.nn.Module, parquet_path, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Predictions computed without hkt_hf.apps.data, datasets or the image processor: pyarrow, PIL and numpy only."""
    table = pq.read_table(parquet_path, columns=["img", "label"])
    images = table.column("img").to_pylist()
    labels = np.asarray(table.column("label").to_pylist())[rows]
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    arrays = [np.asarray(Image.open(io.BytesIO(images[i]["bytes"])).convert("RGB"), dtype=np.float64) for i in rows]
    x = (np.stack(arrays) / 255.0 - mean) / std  # N, H, W, C
    pixels = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in pixels.split(250)])
    return preds.numpy(), labels


def test_accuracy_on_1000_images_matches_independent_computation(resnet20, prepared_test_split, cifar_test_parquet):
    n = 1000
    subset = strided_subset(prepared_test_split, n)
    assert len(subset) == n
    accuracy = top1_accuracy(resnet20, subset, batch_size=250, progress=False)

    rows = np.linspace(0, len(prepared_test_split) - 1, n).round().astype(int).tolist()
    preds, labels = _independent_predictions(resnet20, cifar_test_parquet, rows)
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10  # the stride covers every class equally
    independent_correct = int((preds == labels).sum())
    assert round(accuracy * n / 100) == independent_correct
    assert 70.0 < accuracy < 90.0  # ResNet-20 scores about 81 % on this JPEG split


@pytest.mark.parametrize(
    ("name", "expected"), [("resnet20", 81.03), ("resnet56", 83.20), ("hkt-resnet20", 80.53)]
)
def test_full_test_split_accuracy_matches_the_independent_record(name, expected, checkpoint_path,
                                                                full_prepared_test_split):
    """The accuracies recorded in shared/data/cifar10/README.md by an independent evaluator (10,000 images)."""
    model = import_checkpoint(checkpoint_path(name))
    accuracy = top1_accuracy(model, full_prepared_test_split, batch_size=500, progress=False)
    assert accuracy == pytest.approx(expected, abs=0.05)
