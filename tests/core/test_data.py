"""Dataset loaders on files written in the real on-disk formats; name checks; seeded views."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssql_core.data import SeededViews, check_dataset_name, load_split, pretrain_transform
from ssql_core.errors import ConfigError


def _write_cifar10(root, n=6):
    """torchvision's cifar-10-batches-py layout: pickled dicts with b'data' (N x 3072 uint8)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n)), "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n}, f)


def _write_cifar100(root, n=4):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)


def test_cifar10_and_100_load_from_real_format(tmp_path):
    _write_cifar10(tmp_path)
    _write_cifar100(tmp_path)
    tr = load_split("cifar10", True, data_root=tmp_path)
    te = load_split("cifar10", False, data_root=tmp_path)
    assert len(tr.data) == 30 and len(te.data) == 6 and tr.num_classes == 10
    img, label = tr.data[0]
    assert img.size == (32, 32) and 0 <= label < 10
    c100 = load_split("cifar100", True, data_root=tmp_path)
    assert len(c100.data) == 4 and c100.num_classes == 100
    views = SeededViews(tr.data, pretrain_transform(32, "cifar10"), seed=0)
    v1, v2 = views[0]
    assert v1.shape == (3, 32, 32) and v1.dtype == torch.float32 and not torch.equal(v1, v2)


def test_cifar_missing_gives_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        load_split("cifar10", True, data_root=tmp_path)


def test_imagefolder_loads_and_rejects_escape(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "pets" / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = load_split("imagefolder:pets", True, data_root=tmp_path)
    assert len(s.data) == 6 and s.num_classes == 2
    v1, v2 = SeededViews(s.data, pretrain_transform(16, s.stats_key), seed=1)[4]
    assert v1.shape == (3, 16, 16)
    for bad in ("imagefolder:../pets", "imagefolder:/etc", "imagefolder:a/../../b", "imagefolder:"):
        with pytest.raises(ConfigError) as e:
            check_dataset_name(bad, tmp_path)
        assert e.value.field == "dataset"
    with pytest.raises(ConfigError, match="does not exist"):
        load_split("imagefolder:nothere", True, data_root=tmp_path)


def test_digits_is_real_and_split_fixed():
    tr, te = load_split("digits", True, 16), load_split("digits", False, 16)
    assert len(tr.data) + len(te.data) == 1797 and tr.num_classes == 10
    img, _ = tr.data[0]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and img.max() > 100
    assert torch.equal(load_split("digits", True, 16).data[5][0], img if False else tr.data[5][0])
    sub = load_split("digits", True, 16, max_samples=100, seed=3)
    assert len(sub.data) == 100


def test_views_seeded_per_epoch_and_index():
    s = load_split("synthetic", True, 16)
    views = SeededViews(s.data, pretrain_transform(16, s.stats_key), seed=5)
    a = views[3]
    assert all(torch.equal(x, y) for x, y in zip(a, views[3], strict=True))
    views.set_epoch(1)
    assert not torch.equal(a[0], views[3][0])
