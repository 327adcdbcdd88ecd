"""Where an exported checkpoint's activation ranges come from, recorded in its manifest.

Default: the evaluation protocol's calibration (SPEC 6.2): a seeded random subset of
``images`` training images of the pretrain run's dataset, test transform, FP forwards in eval mode.
With an evaluation's ``heads.pt`` the defaults are that evaluation's settings, so the exported
classifier reproduces the ranges its linear head was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.data import Transformed, load_split, test_transform
from ssql_core.evaluate import calibrate, calibration_images
from ssql_core.qnn import QuantContext


@dataclass(frozen=True)
class CalibrationSpec:
    """A seeded subset of a training split (``dataset=None``: the pretrain run's dataset)."""

    dataset: str | None = None
    images: int = 128
    seed: int = 0
    max_samples: int | None = None
    data_root: str | None = None
    allow_download: bool = False
    batch_size: int = 128

    @classmethod
    def from_eval(cls, cfg: EvalConfig) -> CalibrationSpec:
        """The calibration :func:`ssql_core.evaluate.evaluate` ran with ``cfg``."""
        return cls(dataset=cfg.dataset, images=cfg.calib_images, seed=cfg.seed, max_samples=cfg.max_samples,
                   data_root=cfg.data_root, allow_download=cfg.allow_download, batch_size=min(cfg.batch_size, 256))


#: what ``export_checkpoint(calib=...)`` accepts: a spec, batches (``x`` or ``(x, y)``), or a
#: zero-argument callable returning batches
Calibration = CalibrationSpec | Iterable[Any] | Callable[[], Iterable[Any]] | None


def calibration_loader(spec: CalibrationSpec, pcfg: PretrainConfig) -> tuple[DataLoader, dict[str, Any]]:
    """The images of ``spec`` for a run configured by ``pcfg``, and their manifest description."""
    dataset = spec.dataset or pcfg.dataset
    split = load_split(dataset, True, pcfg.image_size, spec.data_root or pcfg.data_root, spec.allow_download,
                       spec.max_samples, spec.seed)
    plain = Transformed(split.data, test_transform(pcfg.image_size, split.stats_key))
    loader = calibration_images(plain, spec.images, spec.seed, spec.batch_size)
    details = {"source": "dataset", "dataset": dataset, "split": "train", "images": len(loader.dataset), "seed": spec.seed,
               "max_samples": spec.max_samples, "image_size": pcfg.image_size,
               "transform": f"test_transform({pcfg.image_size}, {split.stats_key!r})",
               "selection": "torch.randperm(len(split), Generator().manual_seed(seed))[:images]"}
    return loader, details


def _pairs(batches: Iterable[Any]) -> Iterable[tuple[Tensor, Any]]:
    for b in batches:
        yield (b, None) if isinstance(b, Tensor) else (b[0], None)


def run_calibration(backbone: nn.Module, ctx: QuantContext, calib: Calibration, pcfg: PretrainConfig | None,
                    device: torch.device) -> dict[str, Any]:
    """Record ``backbone``'s activation ranges from ``calib``; returns the manifest's description."""
    if calib is None:
        calib = CalibrationSpec()
    if isinstance(calib, CalibrationSpec):
        if pcfg is None:
            raise ValueError("a CalibrationSpec needs the pretrain run's config (image size, dataset)")
        loader, details = calibration_loader(calib, pcfg)
        details["images"] = calibrate(backbone, ctx, loader, device)
        return details
    batches = calib() if callable(calib) and not isinstance(calib, (DataLoader, list, tuple)) else calib
    n = calibrate(backbone, ctx, _pairs(batches), device)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("calibration produced no images")
    return {"source": "caller-supplied batches", "images": n}
