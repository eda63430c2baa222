"""Shared fixtures: real CIFAR-10 images and reference checkpoints (small copies in tests/fixtures; the full data in
../shared, where present, for the few tests that need it), small datasets cut from them, and imported models. Everything runs offline; the datasets cache lives in a per-session
temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub / datasets: never reach the network, keep the cache out of $HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_DATASETS_CACHE = tempfile.mkdtemp(prefix="hkt-hf-tests-datasets-")
os.environ.setdefault("HF_DATASETS_CACHE", _DATASETS_CACHE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import NEEDS_SHARED, SHARED  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small copies committed with the tests (fixtures/README.md)
CHECKPOINTS = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
    "hkt-resnet20": "hkt-resnet20.pth",
}
TINY_ROWS = 64


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


def _require(path: Path) -> Path:
    # A missing committed fixture is a broken checkout, not a reason to skip: fail loudly.
    assert path.exists(), f"Test fixture {path} is missing (see tests/fixtures/README.md)."
    return path


def _shared(path: Path) -> Path:
    """A file of ../shared: skip the test when the folder is absent (a fresh clone), fail if it lacks the file."""
    if not SHARED.is_dir():
        pytest.skip(NEEDS_SHARED)
    assert path.exists(), f"Shared test resource {path} is missing from ../shared."
    return path


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """Folder holding `train.parquet` (500 rows) and `test.parquet` (1,000 rows): a seeded stratified subset of the
    real CIFAR-10 JPEG re-encode, rows sorted by label, committed in tests/fixtures/cifar10."""
    return _require(FIXTURES / "cifar10")


@pytest.fixture(scope="session")
def cifar_test_parquet(cifar_dir) -> Path:
    return _require(cifar_dir / "test.parquet")


@pytest.fixture(scope="session")
def full_cifar_test_parquet() -> Path:
    """The full real test split (10,000 rows) in ../shared; the test is skipped where ../shared is absent."""
    return _shared(SHARED / "data" / "cifar10" / "test.parquet")


@pytest.fixture(scope="session")
def checkpoint_path():
    """`checkpoint_path("resnet20")` -> path of that reference checkpoint file: the committed copy in
    tests/fixtures/cifar-resnet (ResNet-20 and -56), else the one in ../shared (skipped where that is absent)."""

    def get(name: str) -> Path:
        committed = FIXTURES / "cifar-resnet" / CHECKPOINTS[name]
        return committed if committed.is_file() else _shared(SHARED / "models" / "cifar-resnet" / CHECKPOINTS[name])

    return get


@pytest.fixture(scope="session")
def _cifar_test_split_pristine(cifar_test_parquet):
    from hkt_hf.apps.data.images import load_image_dataset

    return load_image_dataset(str(cifar_test_parquet))["test"]


@pytest.fixture(scope="module")
def cifar_test_split(_cifar_test_split_pristine):
    """The fixture test split (1,000 real CIFAR-10 images, 100 per label) as a raw `datasets.Dataset` (columns `img`,
    `label`), rows sorted by label. Each test module gets its own copy: `set_transform` (as in `prepare_image_dataset`) changes a dataset in
    place, so a module that sets one should still `select`/`strided_subset` first or load its own copy."""
    return _cifar_test_split_pristine.with_format(None)


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory, _cifar_test_split_pristine) -> Path:
    """A folder with `train.parquet` and `test.parquet` of 64 real CIFAR images each, taken with a stride from the
    fixture test split (so every label is present), in the Hub's column layout."""
    out = tmp_path_factory.mktemp("tiny-cifar")
    split = _cifar_test_split_pristine
    n = len(split)
    stride = n // TINY_ROWS
    split.select(range(0, stride * TINY_ROWS, stride)).to_parquet(str(out / "test.parquet"))
    split.select(range(stride // 2, stride * TINY_ROWS, stride)).to_parquet(str(out / "train.parquet"))
    return out


@pytest.fixture(scope="session")
def _tiny_cifar_pristine(tiny_cifar_dir):
    from hkt_hf.apps.data.images import load_image_dataset

    return load_image_dataset(str(tiny_cifar_dir))


@pytest.fixture()
def tiny_cifar(_tiny_cifar_pristine):
    """`DatasetDict` with `train` and `test` splits of 64 real CIFAR images each (columns `img`, `label`).

    A fresh copy per test (a few ms), so a test may `prepare_image_dataset` / `set_transform` it in place."""
    from datasets import DatasetDict

    return DatasetDict({name: split.with_format(None) for name, split in _tiny_cifar_pristine.items()})


@pytest.fixture(scope="session")
def resnet20_dir(tmp_path_factory, checkpoint_path) -> Path:
    """The reference ResNet-20 imported into a save_pretrained folder (model, config, preprocessor)."""
    from hkt_hf.apps.models.cifar_resnet.convert_reference_checkpoint import import_checkpoint

    out = tmp_path_factory.mktemp("resnet20")
    import_checkpoint(checkpoint_path("resnet20"), out)
    return out


@pytest.fixture(scope="session")
def random_image() -> np.ndarray:
    """A 32x32x3 uint8 image without zeros (so zero padding is recognisable) and without left-right symmetry."""
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
