"""The configuration of one SQAKD distillation job (SPEC 8), validated field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ssql_core.bits import parse_bits
from ssql_core.config import MAX_BATCH, MAX_EPOCHS, _check_range, _from_dict
from ssql_core.errors import ConfigError
from ssql_core.quantizers import QUANTIZER_NAMES

BN_MODES = ("recalibrate", "frozen", "train")


@dataclass
class DistillConfig:
    """Teacher = pretrain ``checkpoint`` backbone + the ``fp`` head of ``heads``; student at ``bits``."""

    checkpoint: str = ""  # pretrain checkpoint (``last.pt``): the teacher backbone
    heads: str = ""  # evaluation output (``heads.pt``) holding an "fp" linear head
    bits: str = "4w4a"
    quantizer: str = "psq"  # one of QUANTIZER_NAMES
    dataset: str | None = None  # default: the pretrain run's dataset
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # Adam, student weights and head
    quantizer_lr: float = 1e-5  # Adam, learnable quantizer parameters (alpha, step, interval)
    weight_decay: float = 0.0
    temperature: float = 4.0
    #: weight of a cross-entropy term on labels; 0 (default) = label-free, labels never read
    ce_weight: float = 0.0
    #: EWGS only: the fixed delta, or the initial one when ``ewgs_hessian`` is on
    ewgs_delta: float = 1e-3
    #: EWGS only: re-estimate delta per layer at every epoch start (Hutchinson Hessian trace)
    ewgs_hessian: bool = False
    #: student BatchNorm: "frozen" (the teacher's running statistics, affine parameters trained:
    #: the student starts as the PTQ model), "recalibrate" (running statistics re-estimated on the
    #: quantized student from the calibration images at every epoch start, frozen in between), or
    #: "train" (batch statistics, the reference code's choice)
    bn: str = "recalibrate"
    #: training images seen through RandomResizedCrop(0.8-1) + flip (False: test transform)
    augment: bool = True
    calib_images: int = 128
    max_samples: int | None = None
    seed: int = 0
    data_root: str | None = None
    allow_download: bool = False
    device: str = "auto"
    num_workers: int = 0

    def validate(self) -> DistillConfig:
        from ssql_core.data import check_dataset_name

        for name in ("checkpoint", "heads"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ConfigError(name, "give the path of a file")
        try:
            b = parse_bits(self.bits)
        except ValueError as e:
            raise ConfigError("bits", str(e)) from None
        if b.is_fp:
            raise ConfigError("bits", "distillation trains a quantized student: give e.g. '4w4a', not 'fp'")
        if self.quantizer not in QUANTIZER_NAMES:
            raise ConfigError("quantizer", f"unknown quantizer {self.quantizer!r}; known: {list(QUANTIZER_NAMES)}")
        if self.bn not in BN_MODES:
            raise ConfigError("bn", f"must be one of {list(BN_MODES)}, got {self.bn!r}")
        if self.dataset is not None:
            check_dataset_name(self.dataset, self.data_root, self.allow_download)
        _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_range("batch_size", self.batch_size, 2, MAX_BATCH)
        _check_range("lr", self.lr, 1e-8, 10.0, float)
        _check_range("quantizer_lr", self.quantizer_lr, 0.0, 10.0, float)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0, float)
        _check_range("temperature", self.temperature, 0.05, 100.0, float)
        _check_range("ce_weight", self.ce_weight, 0.0, 100.0, float)
        _check_range("ewgs_delta", self.ewgs_delta, 0.0, 10.0, float)
        for name in ("ewgs_hessian", "augment", "allow_download"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        _check_range("calib_images", self.calib_images, 1, 10**7)
        if self.max_samples is not None:
            _check_range("max_samples", self.max_samples, 2, 10**9)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("num_workers", self.num_workers, 0, 64)
        return self

    @property
    def labels_used(self) -> bool:
        return self.ce_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        return _from_dict(cls, d)
