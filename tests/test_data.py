"""CIFAR data: loading local parquet, augmentation, preprocessing transforms, collation and strided subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Image as ImageFeature
from PIL import Image

from hkt_hf.apps.data.images import (
    image_collator,
    load_image_dataset,
    prepare_image_dataset,
    random_crop_flip,
    strided_subset,
    to_rgb_array,
)
from hkt_hf.apps.models import IMAGENET_MEAN, IMAGENET_STD, cifar_image_processor

PAD = 4


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def crop_flip_candidates(image: np.ndarray, padding: int):
    """Every (top, left, flip) a crop-and-flip with this padding can produce, with its output."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[top : top + h, left : left + w]
            yield (top, left, False), crop
            yield (top, left, True), crop[:, ::-1]


def identify(out: np.ndarray, image: np.ndarray, padding: int) -> tuple[int, int, bool]:
    matches = [key for key, cand in crop_flip_candidates(image, padding) if np.array_equal(out, cand)]
    assert len(matches) == 1, f"output is not exactly one crop/flip of the padded image: {matches}"
    return matches[0]


# ------------------------------------------------------------------------------------------------------ loading


def test_load_parquet_folder_gives_one_split_per_file(tiny_cifar_dir):
    dataset = load_image_dataset(str(tiny_cifar_dir))
    assert isinstance(dataset, DatasetDict)
    assert set(dataset) == {"train", "test"}
    for split in dataset.values():
        assert len(split) == 64
        assert split.column_names == ["img", "label"]
        assert isinstance(split.features["img"], ImageFeature)
        assert split.features["label"].names[0] == "airplane"
        assert len(set(split["label"])) == 10  # a strided cut of label-sorted rows holds every class
    image = dataset["test"][0]["img"]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_load_single_parquet_file_names_split_after_file(tiny_cifar_dir):
    dataset = load_image_dataset(str(tiny_cifar_dir / "test.parquet"))
    assert list(dataset) == ["test"] and len(dataset["test"]) == 64


def test_load_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        load_image_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No parquet file"):
        load_image_dataset(str(tmp_path / "absent.parquet"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a .parquet file"):
        load_image_dataset(str(tmp_path / "config.json"))


def test_to_rgb_array_converts_modes():
    grey = Image.fromarray(np.full((5, 7), 100, dtype=np.uint8), mode="L")
    assert to_rgb_array(grey).shape == (5, 7, 3)
    assert to_rgb_array(grey, num_channels=1).shape == (5, 7, 1)
    rgba = Image.fromarray(np.full((5, 7, 4), 200, dtype=np.uint8), mode="RGBA")
    assert to_rgb_array(rgba).shape == (5, 7, 3)
    with pytest.raises(ValueError, match="num_channels=4"):
        to_rgb_array(rgba, num_channels=4)


# ------------------------------------------------------------------------------------------------- augmentation


def test_random_crop_flip_keeps_shape_and_dtype(random_image):
    for seed in range(20):
        out = random_crop_flip(random_image, PAD, generator=seeded(seed))
        assert out.shape == random_image.shape and out.dtype == np.uint8


def test_random_crop_flip_is_seeded(random_image):
    a = random_crop_flip(random_image, PAD, generator=seeded(7))
    b = random_crop_flip(random_image, PAD, generator=seeded(7))
    assert np.array_equal(a, b)


def test_random_crop_flip_changes_pixels(random_image):
    outputs = [random_crop_flip(random_image, PAD, generator=seeded(seed)) for seed in range(20)]
    changed = [not np.array_equal(out, random_image) for out in outputs]
    assert sum(changed) >= 15  # only (top, left) = (4, 4) without flip, p = 1/162, returns the input
    assert len({out.tobytes() for out in outputs}) >= 15


def test_random_crop_flip_outputs_are_crops_of_the_padded_image(random_image):
    seen = {identify(random_crop_flip(random_image, PAD, generator=seeded(s)), random_image, PAD) for s in range(300)}
    tops, lefts, flips = ({key[i] for key in seen} for i in range(3))
    assert tops == set(range(2 * PAD + 1)) and lefts == set(range(2 * PAD + 1))  # all offsets are drawn
    assert flips == {False, True}
    assert len(seen) > 100  # of 162 combinations


def test_flip_is_a_mirror_and_both_orientations_occur(random_image):
    padded = np.pad(random_image, ((PAD, PAD), (PAD, PAD), (0, 0)))
    flips = []
    for seed in range(64):
        out = random_crop_flip(random_image, PAD, generator=seeded(seed))
        top, left, flip = identify(out, random_image, PAD)
        crop = padded[top : top + 32, left : left + 32]
        assert np.array_equal(out, crop[:, ::-1] if flip else crop)
        assert np.array_equal(out[:, ::-1][:, ::-1], out)
        flips.append(flip)
    assert 16 <= sum(flips) <= 48
    # A mirror-symmetric image comes back unchanged whenever the crop is centred, flipped or not.
    symmetric = np.concatenate([random_image[:, :16], random_image[:, :16][:, ::-1]], axis=1)
    assert all(np.array_equal(random_crop_flip(symmetric, 0, generator=seeded(s)), symmetric) for s in range(8))


@pytest.mark.parametrize("padding", [0, 4])
def test_flip_probability_is_one_half(padding):
    image = np.random.default_rng(1).integers(1, 256, size=(6, 6, 1), dtype=np.uint8)
    n = 4000
    flipped = sum(identify(random_crop_flip(image, padding, generator=seeded(s)), image, padding)[2] for s in range(n))
    assert abs(flipped / n - 0.5) < 0.03  # 4 standard deviations of a fair coin over 4000 draws


def test_padding_puts_zeros_at_borders_for_extreme_offsets(random_image):
    extremes = {}
    for seed in range(400):
        out = random_crop_flip(random_image, PAD, generator=seeded(seed))
        top, left, flip = identify(out, random_image, PAD)
        zero_rows = [i for i in range(32) if not out[i].any()]
        zero_cols = [j for j in range(32) if not out[:, j].any()]
        # Zero bands are exactly the padding the crop took in: |offset - padding| rows/columns on one side.
        expected_rows = list(range(PAD - top)) if top < PAD else list(range(32 - (top - PAD), 32))
        edge = left if not flip else 2 * PAD - left  # a flip moves the left padding to the right
        expected_cols = list(range(PAD - edge)) if edge < PAD else list(range(32 - (edge - PAD), 32))
        assert zero_rows == expected_rows and zero_cols == expected_cols
        assert np.count_nonzero(out.any(-1)) == (32 - abs(top - PAD)) * (32 - abs(left - PAD))
        if top in (0, 2 * PAD) and left in (0, 2 * PAD):
            extremes[(top, left)] = (zero_rows, zero_cols)
    assert len(extremes) >= 2, "400 seeds should reach corner offsets"
    for (top, left), (rows, cols) in extremes.items():
        assert len(rows) == PAD and len(cols) == PAD
        assert rows == (list(range(PAD)) if top == 0 else list(range(32 - PAD, 32)))


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.fixture()
def prepared(tiny_cifar_dir):
    # A fresh load per test: set_transform changes the dataset in place.
    return prepare_image_dataset(load_image_dataset(str(tiny_cifar_dir)), cifar_image_processor())


def test_prepare_yields_normalised_tensors_and_int_labels(prepared, tiny_cifar):
    item = prepared["test"][5]
    assert set(item) == {"pixel_values", "labels"}
    assert isinstance(item["pixel_values"], torch.Tensor)
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert isinstance(item["labels"], torch.Tensor) and item["labels"].dtype == torch.int64
    assert int(item["labels"]) == tiny_cifar["test"][5]["label"]

    raw = np.asarray(tiny_cifar["test"][5]["img"].convert("RGB"), dtype=np.float64) / 255.0
    expected = ((raw - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(item["pixel_values"].numpy(), expected, atol=1e-5)

    batch = prepared["test"][:16]["pixel_values"]
    per_channel_mean = batch.mean(dim=(0, 2, 3))
    assert per_channel_mean.abs().max() < 1.0  # roughly centred, unlike raw [0, 255] or [0, 1] values
    assert batch.min() >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-4
    assert batch.max() <= (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1e-4


def test_only_the_train_split_is_augmented(prepared):
    torch.manual_seed(0)
    test_a, test_b = prepared["test"][:8]["pixel_values"], prepared["test"][:8]["pixel_values"]
    assert torch.equal(test_a, test_b)
    train_a, train_b = prepared["train"][:8]["pixel_values"], prepared["train"][:8]["pixel_values"]
    assert train_a.shape == (8, 3, 32, 32)
    assert not torch.equal(train_a, train_b)


def test_prepare_without_train_split_never_augments(tiny_cifar_dir):
    dataset = prepare_image_dataset(load_image_dataset(str(tiny_cifar_dir)), cifar_image_processor(), train_split=None)
    assert torch.equal(dataset["train"][:4]["pixel_values"], dataset["train"][:4]["pixel_values"])


def test_missing_columns_error_lists_available_columns():
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    no_image = DatasetDict({"test": Dataset.from_dict({"picture": [image], "y": [0]})})
    with pytest.raises(ValueError, match=r"No image column.*\['picture', 'y'\]"):
        prepare_image_dataset(no_image, cifar_image_processor())
    no_label = DatasetDict({"test": Dataset.from_dict({"img": [image], "y": [0]})})
    with pytest.raises(ValueError, match=r"No label column.*\['img', 'y'\]"):
        prepare_image_dataset(no_label, cifar_image_processor())


def test_empty_split_is_an_error(tiny_cifar):
    empty = DatasetDict({"test": tiny_cifar["test"].select([])})
    with pytest.raises(ValueError, match="'test' of the dataset is empty"):
        prepare_image_dataset(empty, cifar_image_processor())


def test_collator_stacks_a_batch(prepared):
    batch = image_collator()([prepared["test"][i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["labels"].shape == (5,) and batch["labels"].dtype == torch.int64


# ------------------------------------------------------------------------------------------------------ subsets


def test_strided_subset_spreads_over_labels(cifar_test_split):
    labels_only = cifar_test_split.select_columns(["label"])
    head = labels_only.select(range(100))
    assert set(head["label"]) == {0}  # rows are sorted by label: a head slice is one class
    subset = strided_subset(labels_only, 100)
    assert len(subset) == 100
    assert np.bincount(subset["label"], minlength=10).tolist() == [10] * 10
    assert np.bincount(strided_subset(labels_only, 1000)["label"], minlength=10).tolist() == [100] * 10


def test_strided_subset_edge_cases(tiny_cifar):
    ds = tiny_cifar["test"]
    for n in (None, 64, 1000):  # everything, as a new object: a transform set on it must not reach `ds`
        whole = strided_subset(ds, n)
        assert whole is not ds and whole["label"] == ds["label"]
    picked = strided_subset(ds.select_columns(["label"]).add_column("row", list(range(64))), 4)["row"]
    assert picked == [0, 21, 42, 63]  # first and last rows included, evenly spaced
    for bad in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            strided_subset(ds, bad)
