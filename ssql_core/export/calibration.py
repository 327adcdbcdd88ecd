"""Where an exported checkpoint's activation ranges come from, recorded in its manifest.

Default: our evaluation's calibration (docs/decisions/017): a seeded random subset of ``images``
training images of the pretrain run's dataset, test transform, FP forwards in eval mode, ranges
that minimise each point's quantization MSE (SPEC 6.2's min-max is ``method="minmax"``).
``method`` picks the range rule (:mod:`ssql_core.calibration`); ``mse`` and
``weights="quantized"`` depend on the bit-width, so export then calibrates once per file.
With an evaluation's ``heads.pt`` the defaults are that evaluation's settings, so the exported
classifier reproduces the ranges its linear head was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssql_core.calibration import calibrate_ranges
from ssql_core.config import CALIBRATIONS, INTERPOLATIONS, EvalConfig, PretrainConfig
from ssql_core.data import Transformed, load_split, stats_key_for, test_transform
from ssql_core.evaluate import calibrate, calibration_set
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
    #: range rule: mse (ours), minmax (SPEC 6), reference, percentile (EvalConfig.calibration)
    method: str = "mse"
    percentile: float = 99.99
    #: "fp" (the paper) or "quantized": ranges recorded with the weights quantized at the file's bits
    weights: str = "fp"
    #: the test transform's resize ("bilinear" or the reference's "bicubic")
    interpolation: str = "bilinear"
    #: "standard" or "reference" (EvalConfig.normalization); None: the pretrain run's own
    normalization: str | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATIONS:
            raise ValueError(f"calibration method must be one of {list(CALIBRATIONS)}, got {self.method!r}")
        if self.weights not in ("fp", "quantized"):
            raise ValueError(f"calibration weights must be 'fp' or 'quantized', got {self.weights!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"calibration interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def per_bits(self) -> bool:
        """Whether the ranges depend on the bit-width (then each file is calibrated on its own)."""
        return self.method == "mse" or self.weights == "quantized"

    def with_method(self, method: str | None, percentile: float | None = None) -> CalibrationSpec:
        if method is None:
            return self
        return dataclasses.replace(self, method=method, percentile=self.percentile if percentile is None else percentile)

    @classmethod
    def from_eval(cls, cfg: EvalConfig) -> CalibrationSpec:
        """The calibration :func:`ssql_core.evaluate.evaluate` ran with ``cfg``."""
        cfg = dataclasses.replace(cfg).fill_from_preset()
        return cls(dataset=cfg.dataset, images=cfg.calib_images, seed=cfg.seed, max_samples=cfg.max_samples,
                   data_root=cfg.data_root, allow_download=cfg.allow_download, batch_size=min(cfg.batch_size, 256),
                   method=cfg.calibration, percentile=cfg.calib_percentile, weights=cfg.calib_weights,
                   interpolation=cfg.interpolation, normalization=cfg.normalization)


#: what ``export_checkpoint(calib=...)`` accepts: a spec, batches (``x`` or ``(x, y)``), or a
#: zero-argument callable returning batches
Calibration = CalibrationSpec | Iterable[Any] | Callable[[], Iterable[Any]] | None


def calibration_loader(spec: CalibrationSpec, pcfg: PretrainConfig) -> tuple[DataLoader, dict[str, Any]]:
    """The images of ``spec`` for a run configured by ``pcfg``, and their manifest description."""
    dataset = spec.dataset or pcfg.dataset
    split = load_split(dataset, True, pcfg.image_size, spec.data_root or pcfg.data_root, spec.allow_download,
                       spec.max_samples, spec.seed)
    stats_key = stats_key_for(split.stats_key, spec.normalization or pcfg.normalization)
    plain = Transformed(split.data, test_transform(pcfg.image_size, stats_key, spec.interpolation))
    loader = calibration_set(spec.method, split.data, plain, pcfg.image_size, stats_key, spec.images, spec.seed,
                             spec.batch_size)
    transform = (f"linear_train_transform({pcfg.image_size}, {stats_key!r}), seeded per (seed, 0, index)"
                 if spec.method == "reference" else f"test_transform({pcfg.image_size}, {stats_key!r}, {spec.interpolation!r})")
    details = {"source": "dataset", "dataset": dataset, "split": "train", "images": len(loader.dataset), "seed": spec.seed,
               "max_samples": spec.max_samples, "image_size": pcfg.image_size, "transform": transform,
               "selection": "torch.randperm(len(split), Generator().manual_seed(seed))[:images]",
               "method": spec.method, "weights": spec.weights,
               **({"percentile": spec.percentile} if spec.method == "percentile" else {})}
    return loader, details


def _pairs(batches: Iterable[Any]) -> Iterable[tuple[Tensor, Any]]:
    for b in batches:
        yield (b, None) if isinstance(b, Tensor) else (b[0], None)


def run_calibration(backbone: nn.Module, ctx: QuantContext, calib: Calibration, pcfg: PretrainConfig | None,
                    device: torch.device, bits: Any = "8w8a") -> dict[str, Any]:
    """Record ``backbone``'s activation ranges from ``calib`` (for a file at ``bits`` when the spec's
    ranges depend on it); returns the manifest's description."""
    if calib is None:
        calib = CalibrationSpec()
    if isinstance(calib, CalibrationSpec):
        if pcfg is None:
            raise ValueError("a CalibrationSpec needs the pretrain run's config (image size, dataset)")
        loader, details = calibration_loader(calib, pcfg)
        details["images"] = calibrate_ranges(backbone, ctx, loader, device, bits, calib.method, calib.percentile,
                                             quantized_weights=calib.weights == "quantized", seed=calib.seed)
        if calib.per_bits:
            details["bits"] = str(bits)
        return details
    batches = calib() if callable(calib) and not isinstance(calib, (DataLoader, list, tuple)) else calib
    n = calibrate(backbone, ctx, _pairs(batches), device)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("calibration produced no images")
    return {"source": "caller-supplied batches", "images": n, "method": "minmax", "weights": "fp"}
