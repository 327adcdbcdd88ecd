"""Label-free image access for distillation: the training path never asks a dataset for a label.

``image_at`` reads the image of item ``i`` straight from the project's dataset types (tensor
images, torchvision CIFAR arrays, image folders, subsets of those), or from any dataset with an
``image(i)`` method, so a distillation job provably runs on unlabelled data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ssql_core.data import TensorImages, sample_seed


def image_at(ds: Any, i: int) -> Any:
    """The image of item ``i`` of ``ds``, without touching its label."""
    if hasattr(ds, "image"):
        return ds.image(i)
    if isinstance(ds, Subset):
        return image_at(ds.dataset, int(ds.indices[i]))
    if isinstance(ds, TensorImages):
        return ds.images[i]
    if hasattr(ds, "samples") and hasattr(ds, "loader"):  # torchvision ImageFolder
        return ds.loader(ds.samples[i][0])
    if hasattr(ds, "data") and hasattr(ds, "targets"):  # torchvision CIFAR: HWC uint8 arrays
        from PIL import Image

        return Image.fromarray(ds.data[i])
    raise TypeError(f"cannot read images without labels from {type(ds).__name__}; give it an image(i) method")


def num_images(ds: Any) -> int:
    if hasattr(ds, "image"):
        return len(ds)
    if isinstance(ds, Subset):
        return len(ds.indices)
    if isinstance(ds, TensorImages):
        return len(ds.images)
    return len(ds)


class ImagesOnly(Dataset):
    """Transformed images of a dataset, seeded per (seed, epoch, index); no labels."""

    def __init__(self, base: Any, transform: Any, seed: int = 0) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.epoch = 0
        self.n = num_images(base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        img = image_at(self.base, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.transform(img)
