"""Datasets by name, the SPEC's augmentations, and per-sample seeded two-view sampling.

Names: ``digits`` (scikit-learn's 1797 real handwritten digits, upscaled), ``synthetic``
(deterministic class patterns, for tests), ``fashion_mnist`` / ``mnist`` (the IDX files, see
:func:`idx_locations`), ``cifar10`` / ``cifar100`` (torchvision's on-disk format under the data
root), ``imagefolder:<name>`` (``<root>/<name>/{train,val}/<class>/*``).

Augmentations are seeded per (seed, epoch, index), so a run's data stream does not depend on the
number of loader workers or on where a resumed run restarted.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ssql_core.errors import ConfigError

DATASET_NAMES = ("digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder:<name>")
#: named datasets read from files (``imagefolder:<name>`` aside)
_NAMED = ("digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100")
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "digits": ((0.30, 0.30, 0.30), (0.40, 0.40, 0.40)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    # measured on the 60 000 training images at 28 px (tests/core/test_idx_datasets.py re-measures)
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "mnist": ((0.1307, 0.1307, 0.1307), (0.3081, 0.3081, 0.3081)),
    # the reference code's CIFAR-10 std (a widely copied value that is not the pixel std)
    "cifar10@reference": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}


def stats_key_for(stats_key: str, normalization: str | None) -> str:
    """The statistics a split is normalised with under ``normalization`` ("standard" or
    "reference"): the reference's own values where it has them (CIFAR-10), the measured ones otherwise."""
    key = f"{stats_key}@reference"
    return key if normalization == "reference" and key in _STATS else stats_key

#: IDX datasets: name -> (folder under the data root, torchvision's folder, Debian package or None)
_IDX = {"fashion_mnist": ("fashion-mnist", "FashionMNIST", "dataset-fashion-mnist"), "mnist": ("mnist", "MNIST", None)}
_IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def system_datasets_dir() -> Path:
    """Where Debian's dataset packages put their files (``SSQL_SYSTEM_DATASETS`` overrides)."""
    return Path(os.environ.get("SSQL_SYSTEM_DATASETS", "/usr/share/datasets"))


def default_data_root() -> Path:
    return Path(os.environ.get("SSQL_DATA_ROOT", "./data"))


def _folder_path(name: str, data_root: str | Path | None) -> Path:
    sub = name.split(":", 1)[1]
    if not _FOLDER_NAME.match(sub) or ".." in sub:
        raise ConfigError("dataset", f"imagefolder name {sub!r} must be a plain folder name (letters, digits, '.', '_', '-'), inside the data root")
    root = Path(data_root or default_data_root()).resolve()
    path = (root / sub).resolve()
    if root not in path.parents:
        raise ConfigError("dataset", f"imagefolder name {sub!r} escapes the data root")
    return path


def check_dataset_name(name: str, data_root: str | Path | None = None, allow_download: bool = False) -> None:
    """Raise :class:`ConfigError` on ``dataset`` unless ``name`` is a known dataset name (and, for
    the IDX datasets, unless its files are found or may be downloaded)."""
    if not isinstance(name, str):
        raise ConfigError("dataset", f"must be a string, got {name!r}")
    if name.startswith("imagefolder:"):
        _folder_path(name, data_root)
        return
    if name not in _NAMED:
        raise ConfigError("dataset", f"unknown dataset {name!r}; known: {list(DATASET_NAMES)}")
    if name in _IDX and not allow_download and find_idx_folder(name, data_root) is None:
        raise ConfigError("dataset", idx_missing_message(name, data_root))


def idx_locations(name: str, data_root: str | Path | None = None) -> list[Path]:
    """Folders searched, in order, for an IDX dataset's four files (``.gz`` or not):
    ``<root>/<name>/``, torchvision's ``<root>/<Name>/raw/``, then Debian's ``/usr/share/datasets/<name>/``."""
    folder, tv, _ = _IDX[name]
    root = Path(data_root or default_data_root())
    return [root / folder, root / tv / "raw", system_datasets_dir() / folder]


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_folder(name: str, data_root: str | Path | None = None) -> Path | None:
    """The first of :func:`idx_locations` that holds all four files, or None."""
    stems = [*_IDX_FILES[True], *_IDX_FILES[False]]
    for folder in idx_locations(name, data_root):
        if all(_idx_file(folder, s) is not None for s in stems):
            return folder
    return None


def idx_missing_message(name: str, data_root: str | Path | None = None) -> str:
    _, _, package = _IDX[name]
    looked = ", ".join(str(p) for p in idx_locations(name, data_root))
    files = ", ".join(f"{s}.gz" for s in (*_IDX_FILES[True], *_IDX_FILES[False]))
    how = f"install them with `apt-get install {package}`, or " if package else ""
    return (f"{name}: its IDX files were not found (looked in {looked}); {how}copy the four files ({files}) "
            f"into the first folder, or allow downloads (torchvision's {_IDX[name][1]} downloader)")


@dataclass
class Split:
    """A labelled image set: ``images[i]`` is a uint8 CHW tensor or a PIL image."""

    data: Dataset
    num_classes: int
    stats_key: str


class TensorImages(Dataset):
    """uint8 images in one tensor [N, 3, H, W] with integer labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def _digits(train: bool, image_size: int) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8]
    y = torch.tensor(d.target, dtype=torch.long)
    # a fixed stratified 80/20 split (seed 0), the same on every machine
    rng = np.random.default_rng(0)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        test_idx.extend(rng.permutation(idx)[: len(idx) // 5])
    mask = np.ones(len(y), dtype=bool)
    mask[np.array(test_idx)] = False
    sel = torch.from_numpy(mask if train else ~mask)
    x = F.interpolate(x[sel], size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return Split(TensorImages(x, y[sel]), 10, "digits")


def _synthetic(train: bool, image_size: int, n: int = 512, classes: int = 10) -> Split:
    """Deterministic images: a per-class low-frequency pattern plus per-image noise and shift."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=(image_size, image_size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(99 if train else 100)
    y = torch.arange(n) % classes
    noise = torch.rand(n, 3, image_size, image_size, generator=g) * 0.3
    x = (protos[y] * 0.7 + noise).clamp(0, 1)
    return Split(TensorImages((x * 255).to(torch.uint8), y), classes, "synthetic")


def _fit_size(x: Tensor, image_size: int) -> Tensor:
    """uint8 [N, 1, 28, 28] to ``image_size``: zero-padded (centred) from 28 to 36 px, resized otherwise."""
    h = x.shape[-1]
    if h <= image_size <= h + 8:
        lo = (image_size - h) // 2
        return F.pad(x, (lo, image_size - h - lo, lo, image_size - h - lo))
    y = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


def _idx_dataset(name: str, train: bool, image_size: int, root: Path, allow_download: bool) -> Split:
    from ssql_core.idx import IDXError, read_idx

    folder = find_idx_folder(name, root)
    if folder is None:
        if not allow_download:
            raise ConfigError("dataset", idx_missing_message(name, root))
        from torchvision.datasets import MNIST, FashionMNIST

        (FashionMNIST if name == "fashion_mnist" else MNIST)(str(root), train=train, download=True)
        folder = root / _IDX[name][1] / "raw"
    img_stem, lbl_stem = _IDX_FILES[train]
    img_path, lbl_path = _idx_file(folder, img_stem), _idx_file(folder, lbl_stem)
    assert img_path is not None and lbl_path is not None
    try:
        images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    except IDXError as e:
        raise ConfigError("dataset", f"{name}: {e}") from None
    if len(images) != len(labels):
        raise ConfigError("dataset", f"{name}: {img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and int(labels.max()) > 9:
        raise ConfigError("dataset", f"{name}: {lbl_path} has label {int(labels.max())}, expected 0..9")
    x = _fit_size(torch.from_numpy(images.copy()).unsqueeze(1), image_size)
    # grayscale replicated to 3 channels (a view), so backbones keep torchvision's 3-channel stem
    return Split(TensorImages(x.expand(-1, 3, -1, -1), torch.from_numpy(labels.astype(np.int64))), 10, name)


def _cifar(name: str, train: bool, root: Path, allow_download: bool) -> Split:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class _Cifar(base):  # type: ignore[valid-type, misc]
        """torchvision's reader; without downloading, files must exist (their MD5 is checked
        only on the download path, so a locally prepared copy in the same format loads)."""

        def _check_integrity(self) -> bool:
            if allow_download:
                return super()._check_integrity()
            folder = Path(self.root) / self.base_folder
            files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all((folder / f).is_file() for f in files)

        def _load_meta(self) -> None:
            import pickle

            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    folder = Path(root) / base.base_folder
    try:
        ds = _Cifar(str(root), train=train, download=allow_download)
    except RuntimeError as e:
        raise ConfigError("dataset", f"{name} not found under {root} (expected {folder}); put torchvision's {name} files there, or allow downloading") from e
    return Split(ds, 10 if name == "cifar10" else 100, name)


def _imagefolder(name: str, train: bool, root: str | Path | None) -> Split:
    from torchvision.datasets import ImageFolder

    path = _folder_path(name, root) / ("train" if train else "val")
    if not path.is_dir():
        raise ConfigError("dataset", f"{name}: folder {path} does not exist (expected <root>/<name>/train and /val with one folder per class)")
    ds = ImageFolder(str(path), loader=lambda p: _pil_rgb(p))
    return Split(ds, len(ds.classes), "imagenet")


def _pil_rgb(path: str) -> Any:
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def load_split(name: str, train: bool, image_size: int = 32, data_root: str | Path | None = None,
               allow_download: bool = False, max_samples: int | None = None, seed: int = 0) -> Split:
    """Load one split of a named dataset; ``max_samples`` keeps a seeded random subset."""
    check_dataset_name(name, data_root, allow_download)
    root = Path(data_root or default_data_root())
    if name == "digits":
        split = _digits(train, image_size)
    elif name == "synthetic":
        split = _synthetic(train, image_size)
    elif name in _IDX:
        split = _idx_dataset(name, train, image_size, root, allow_download)
    elif name in ("cifar10", "cifar100"):
        split = _cifar(name, train, root, allow_download)
    else:
        split = _imagefolder(name, train, data_root)
    if max_samples is not None and max_samples < len(split.data):
        idx = torch.randperm(len(split.data), generator=torch.Generator().manual_seed(seed))[:max_samples]
        split = Split(Subset(split.data, sorted(idx.tolist())), split.num_classes, split.stats_key)
    return split


def _finish(stats_key: str) -> list[Any]:
    mean, std = _STATS[stats_key]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def pretrain_transform(image_size: int, stats_key: str) -> v2.Compose:
    """SPEC 5 augmentations; Gaussian blur (p=0.5) only at ImageNet-like sizes."""
    t: list[Any] = [
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomHorizontalFlip(),
    ]
    if image_size > 64:
        k = int(0.1 * image_size) // 2 * 2 + 1
        t.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose(t + _finish(stats_key))


def linear_train_transform(image_size: int, stats_key: str) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip()] + _finish(stats_key))


def test_transform(image_size: int, stats_key: str, interpolation: str = "bilinear") -> v2.Compose:
    """Resize to 36/32 of the size, centre crop (SPEC 6.4); ``interpolation`` "bicubic" is the reference's resize."""
    mode = v2.InterpolationMode.BICUBIC if interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    return v2.Compose([v2.Resize(int(round(image_size * 36 / 32)), interpolation=mode, antialias=True),
                       v2.CenterCrop(image_size)] + _finish(stats_key))


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across Python versions and processes."""
    h = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class SeededViews(Dataset):
    """``n_views`` augmented views of each image, seeded per (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Any, seed: int, n_views: int = 2, with_label: bool = False) -> None:
        self.base, self.transform, self.seed, self.n_views = base, transform, seed, n_views
        self.with_label = with_label
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int | tuple[int, int]) -> Any:
        """Image ``i``'s views in the current epoch; ``(epoch, i)``: in that epoch (a sampler that
        spans epochs, so one DataLoader's workers serve the whole run)."""
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        img, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            views = tuple(self.transform(img) for _ in range(self.n_views))
        return (*views, label) if self.with_label else views


class Transformed(Dataset):
    """A deterministic transform of a labelled dataset (evaluation images)."""

    def __init__(self, base: Dataset, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.base[i]
        return self.transform(img), label
