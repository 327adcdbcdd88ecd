"""Fashion-MNIST and MNIST through their IDX files: both folder layouts, gzipped or not, the real
files when the Debian package is installed, and every error path naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.data import find_idx_folder, idx_locations, load_split, system_datasets_dir
from ssql_core.errors import ConfigError
from ssql_core.idx import IDXError, read_idx, write_idx

REAL = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train-images-idx3-ubyte": (3, 60), "train-labels-idx1-ubyte": (1, 60),
         "t10k-images-idx3-ubyte": (3, 20), "t10k-labels-idx1-ubyte": (1, 20)}


def write_fake(folder: Path, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for stem, (ndim, n) in FILES.items():
        a = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if ndim == 3 else (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / (stem + (".gz" if gz else "")), a)
        arrays[stem] = a
    return arrays


@pytest.fixture(autouse=True)
def no_system_datasets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests see only their own files unless they ask for the real ones."""
    monkeypatch.setenv("SSQL_SYSTEM_DATASETS", str(tmp_path / "no-system-datasets"))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.gz" if gz else "x")
    write_idx(path, a)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    np.testing.assert_array_equal(read_idx(path, 3), a)


@pytest.mark.parametrize("layout", ["fashion-mnist", "FashionMNIST/raw"])
def test_both_layouts_load_with_padding_and_three_channels(tmp_path: Path, layout: str) -> None:
    arrays = write_fake(tmp_path / layout, gz=layout == "fashion-mnist")
    assert find_idx_folder("fashion_mnist", tmp_path) == tmp_path / layout
    train = load_split("fashion_mnist", True, 32, tmp_path)
    test = load_split("fashion_mnist", False, 32, tmp_path)
    assert (len(train.data), len(test.data), train.num_classes) == (60, 20, 10)
    img, label = train.data[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 7
    assert torch.equal(img[0], img[2])  # grayscale replicated
    assert torch.equal(img[0, 2:30, 2:30], torch.from_numpy(arrays["train-images-idx3-ubyte"][7]))
    assert img[0, :2].sum() == 0 and img[0, 30:].sum() == 0  # zero padding, centred
    small = load_split("fashion_mnist", True, 16, tmp_path, max_samples=10)
    assert len(small.data) == 10 and small.data[0][0].shape == (3, 16, 16)


def test_missing_files_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        PretrainConfig(dataset="fashion_mnist", data_root=str(tmp_path)).validate()
    assert e.value.field == "dataset"
    msg = str(e.value)
    for p in idx_locations("fashion_mnist", tmp_path):
        assert str(p) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "allow downloads" in msg
    with pytest.raises(ConfigError, match="mnist: its IDX files were not found"):
        load_split("mnist", True, 32, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "corrupt_gzip", "wrong_magic", "label_count"])
def test_damaged_files_name_the_file(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "mnist"
    write_fake(folder)
    victim = folder / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        raw = gzip.decompress(victim.read_bytes())
        victim.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    elif damage == "corrupt_gzip":
        blob = bytearray(victim.read_bytes())
        victim.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "wrong_magic":
        write_idx(victim, np.zeros((60, 28), dtype=np.uint8))
    else:
        victim = folder / "train-labels-idx1-ubyte.gz"
        write_idx(victim, np.zeros(59, dtype=np.uint8))
    with pytest.raises(ConfigError) as e:
        load_split("mnist", True, 32, tmp_path)
    assert e.value.field == "dataset" and str(victim) in str(e.value)


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "g"
    p.write_bytes(b"\x00\x00")
    with pytest.raises(IDXError, match="too short"):
        read_idx(p, 1)
    with pytest.raises(IDXError, match="not found"):
        read_idx(tmp_path / "absent", 1)


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SSQL_SYSTEM_DATASETS", str(REAL.parent))
    assert find_idx_folder("fashion_mnist", tmp_path) == system_datasets_dir() / "fashion-mnist"
    train = load_split("fashion_mnist", True, 28, tmp_path)
    test = load_split("fashion_mnist", False, 28, tmp_path, max_samples=500)
    assert len(train.data) == 60000 and len(test.data) == 500
    x = train.data.images[:, 0].float() / 255
    # the normalisation constants in ssql_core.data are the training split's own statistics
    assert abs(x.mean().item() - 0.2860) < 1e-3 and abs(x.std().item() - 0.3530) < 1e-3
    assert torch.bincount(train.data.labels).tolist() == [6000] * 10
