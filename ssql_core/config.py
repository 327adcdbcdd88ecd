"""Typed run configurations with validation that names the offending field.

Configs are plain dataclasses so that they round-trip through JSON (the service stores them in
its job rows) and through ``torch.save(..., weights_only=True)`` checkpoints (as dicts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ssql_core.bits import parse_bits
from ssql_core.errors import ConfigError

#: Hard limits the library enforces on its own; the service may impose tighter ones.
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_DEVICES = 64
#: where a pretraining run makes its augmented views (PretrainConfig.input_pipeline)
INPUT_PIPELINES = ("auto", "device", "loader")


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(name, f"must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")


def _check_bit_range(name: str, value: Any, lo_allowed: int) -> tuple[int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(name, f"must be a pair [low, high] of integers, got {value!r}")
    lo, hi = value
    if not (lo_allowed <= lo <= hi <= 8):
        raise ConfigError(name, f"needs {lo_allowed} <= low <= high <= 8, got {list(value)}")
    return int(lo), int(hi)


#: the choices of each reference behaviour, ours first (the default)
QUANT_BEHAVIOURS: dict[str, tuple[str, ...]] = {
    "weight_scale_grad": ("detached", "attached"),
    "rounding": ("reciprocal", "divide"),
    "init": ("torchvision", "pytorch"),
}
#: the reference code's data and schedule behaviours of pretraining, ours first (the default)
TRAINING_BEHAVIOURS: dict[str, tuple[Any, ...]] = {
    "normalization": ("standard", "reference"),
    "drop_last": (True, False),
    "lr_step": ("step", "epoch"),
}
#: ``preset`` -> the behaviours it sets (None: ours)
PRESETS: dict[str | None, dict[str, Any]] = {
    None: {k: v[0] for k, v in {**QUANT_BEHAVIOURS, **TRAINING_BEHAVIOURS}.items()},
    "reference": {"weight_scale_grad": "attached", "rounding": "divide", "init": "pytorch",
                  "normalization": "reference", "drop_last": False, "lr_step": "epoch"},
}
#: evaluation presets (docs/decisions/017): None = ours (MSE ranges, a BN probe that converges);
#: "paper" = SPEC 6 as written (min-max on 128 test-transformed images, the lr-30 linear probe);
#: "reference" = what the authors' evaluation code does (one augmented batch of 512 images for
#: the ranges, bicubic resize, its CIFAR-10 std, the lr-30 linear probe)
EVAL_PRESETS: dict[str | None, dict[str, Any]] = {
    None: {"calibration": "mse", "probe": "bn", "lr": 0.1, "calib_images": 128, "interpolation": "bilinear"},
    "paper": {"calibration": "minmax", "probe": "linear", "lr": 30.0, "calib_images": 128, "interpolation": "bilinear"},
    "reference": {"calibration": "reference", "probe": "linear", "lr": 30.0, "calib_images": 512,
                  "interpolation": "bicubic", "normalization": "reference"},
}
INTERPOLATIONS = ("bilinear", "bicubic")
#: activation calibration methods of evaluation and export (SPEC 6 uses minmax)
CALIBRATIONS = ("minmax", "reference", "percentile", "mse")
#: linear probes: the paper's plain linear layer, or a parameter-free BatchNorm before it
PROBES = ("linear", "bn")
#: post-training quantization of evaluation and export: calibration only (the paper), or
#: reconstruction that also learns the weights' rounding (ssql_core.ptq; docs/decisions/016)
PTQ_METHODS = ("calibrate", "adaround", "brecq")
#: bounds of the reconstruction settings (images are held in memory per unit)
PTQ_MAX_IMAGES = 8192
PTQ_MAX_ITERS = 100_000


def _check_finite_list(name: str, value: Any, lo: float, hi: float, length: int | None = None) -> None:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise ConfigError(name, f"must be a list of {length or 'some'} numbers, got {value!r}")
    for v in value:
        _check_range(name, v, lo, hi, float)


def check_milestones(name: str, value: Any) -> None:
    """Learning-rate milestones (fractions of the run, 0..1): two, strictly increasing. A
    decreasing pair would drop the rate at the later point first and an equal pair twice at once."""
    _check_finite_list(name, value, 0.0, 1.0, 2)
    if not all(a < b for a, b in zip(value, value[1:], strict=False)):
        raise ConfigError(name, f"must be strictly increasing (e.g. [0.6, 0.8]), got {list(value)}")


@dataclass
class PretrainConfig:
    """Everything that defines one self-supervised pretraining run."""

    method: str = "ssql"
    backbone: str = "resnet18"
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    image_size: int = 32
    width: float = 1.0
    max_samples: int | None = None
    #: per-step bit-width ranges for SSQL methods (SPEC 4.3): weights 2..8, activations 4..8
    w_bits: tuple[int, int] = (2, 8)
    a_bits: tuple[int, int] = (4, 8)
    #: fixed target bit-width for fixed-bit QAT baselines (``simsiam_pact``)
    bits: str | None = None
    stem: str = "auto"  # "cifar", "imagenet" or "auto" (cifar below 64 px)
    data_root: str | None = None
    allow_download: bool = False
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # on CUDA only; ignored on the CPU (runtime.use_channels_last)
    compile: bool = False
    #: where the two views are made (docs/decisions/012): "device" on the training device, batched,
    #: from uint8 images held there (in-memory datasets only); "loader" per image in DataLoader
    #: workers; "auto": "device" for an in-memory dataset on CUDA, "loader" otherwise
    input_pipeline: str = "auto"
    #: processes (one per GPU; CPU processes with gloo where there is no GPU) of one run, under
    #: DistributedDataParallel; each gets batch_size / devices images of every global batch
    devices: int = 1
    #: SyncBatchNorm across the devices (CUDA only)
    sync_bn: bool = False
    #: write a resumable checkpoint every this many steps (and always at an epoch end)
    checkpoint_every_steps: int = 200
    method_options: dict[str, Any] = field(default_factory=dict)
    #: the reference implementation's behaviours (docs/decisions/008): ``preset="reference"`` sets
    #: the three below to the reference's choices; a field given explicitly wins over the preset
    preset: str | None = None
    #: "detached" (ours): no gradient through the weight scale; "attached" (reference): each
    #: channel's largest weight also gets a gradient through its scale
    weight_scale_grad: str | None = None
    #: "reciprocal" (ours, as torch.fake_quantize_*): x * (1/s); "divide" (reference): x / s
    rounding: str | None = None
    #: "torchvision" (ours): kaiming-normal fan_out convolutions; "pytorch" (reference): nn.Conv2d's default
    init: str | None = None
    #: "standard" (ours): the dataset's measured mean/std; "reference": the reference code's
    #: CIFAR-10 std (0.2023, 0.1994, 0.2010) (the same as "standard" on every other dataset)
    normalization: str | None = None
    #: true (ours): an epoch's last partial batch is dropped; false (reference): it is trained on
    #: too (when it holds at least 2 images per device: BatchNorm needs two)
    drop_last: bool | None = None
    #: "step" (ours): the cosine learning rate moves every step; "epoch" (reference): once per epoch
    lr_step: str | None = None

    def validate(self) -> PretrainConfig:
        from ssql_core.data import check_dataset_name
        from ssql_core.methods import METHODS
        from ssql_core.models import BACKBONES

        if self.method not in METHODS:
            raise ConfigError("method", f"unknown method {self.method!r}; known: {sorted(METHODS)}")
        if self.backbone not in BACKBONES:
            raise ConfigError("backbone", f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        check_dataset_name(self.dataset, self.data_root, self.allow_download)
        _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_range("batch_size", self.batch_size, 2, MAX_BATCH)
        _check_range("lr", self.lr, 1e-8, 100.0, float)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0, float)
        _check_range("momentum", self.momentum, 0.0, 0.9999, float)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("image_size", self.image_size, 8, 1024)
        _check_range("width", self.width, 0.03125, 4.0, float)
        if self.max_samples is not None:
            _check_range("max_samples", self.max_samples, 2, 10**9)
        self.w_bits = _check_bit_range("w_bits", self.w_bits, 2)
        self.a_bits = _check_bit_range("a_bits", self.a_bits, 2)
        if self.stem not in ("auto", "cifar", "imagenet"):
            raise ConfigError("stem", f"must be 'auto', 'cifar' or 'imagenet', got {self.stem!r}")
        _check_range("num_workers", self.num_workers, 0, 64)
        if self.input_pipeline not in INPUT_PIPELINES:
            raise ConfigError("input_pipeline", f"must be one of {list(INPUT_PIPELINES)}, got {self.input_pipeline!r}")
        _check_range("devices", self.devices, 1, MAX_DEVICES)
        if self.batch_size % self.devices:
            raise ConfigError("devices", f"batch_size {self.batch_size} must be a multiple of devices ({self.devices}): "
                              "each device takes an equal share of every batch")
        if not isinstance(self.sync_bn, bool):
            raise ConfigError("sync_bn", f"must be true or false, got {self.sync_bn!r}")
        _check_range("checkpoint_every_steps", self.checkpoint_every_steps, 1, 10**9)
        if not isinstance(self.method_options, dict):
            raise ConfigError("method_options", "must be an object of option name -> value")
        method_cls = METHODS[self.method]
        if self.bits is not None:
            try:
                parse_bits(self.bits)
            except ValueError as e:
                raise ConfigError("bits", str(e)) from None
        if getattr(method_cls, "needs_fixed_bits", False):
            if self.bits is None or parse_bits(self.bits).is_fp:
                raise ConfigError("bits", f"method {self.method!r} trains at one fixed bit-width: give e.g. '4w4a'")
        method_cls.check_options(self.method_options)
        self._resolve_preset()
        return self

    def _resolve_preset(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {sorted(k for k in PRESETS if k)} or null, got {self.preset!r}")
        for name, choices in {**QUANT_BEHAVIOURS, **TRAINING_BEHAVIOURS}.items():
            value = getattr(self, name)
            if value is None:
                value = PRESETS[self.preset][name]
            if isinstance(value, bool) != isinstance(choices[0], bool) or value not in choices:
                raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}")
            setattr(self, name, value)

    def resolved_stem(self) -> str:
        if self.stem != "auto":
            return self.stem
        return "cifar" if self.image_size <= 64 else "imagenet"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["w_bits"], d["a_bits"] = list(self.w_bits), list(self.a_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        return _from_dict(cls, d)


@dataclass
class EvalConfig:
    """Evaluation of a pretrained backbone at several bit-widths (SPEC 6)."""

    checkpoint: str = ""  # path of a pretrain checkpoint (``last.pt``) or ``backbone.pt``
    dataset: str | None = None  # default: the pretrain run's dataset
    #: bit-widths ("fp", "4w4a") and per-layer maps ({"layer1.0.conv1": "4w8a", ...}; ssql_core.bitconfig)
    bits: list[Any] = field(default_factory=lambda: ["fp", "8w8a", "4w4a", "2w4a"])
    protocol: str = "linear"  # "linear" or "knn"
    #: "cached": classifier on frozen features computed once per bit-width (fast);
    #: "augmented": the paper's protocol, backbone forward on augmented images every epoch
    path: str = "cached"
    #: None (ours), "paper" or "reference": the defaults of the fields left None below
    #: (EVAL_PRESETS; docs/decisions/017); a field given explicitly wins over the preset
    preset: str | None = None
    epochs: int = 100
    batch_size: int = 512
    lr: float | None = None  # ours 0.1 (BN probe); the paper's linear probe 30
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_milestones: tuple[float, float] = (0.6, 0.8)
    calib_images: int | None = None  # ours and the paper 128; the reference 512
    #: activation ranges: "minmax" (SPEC 6), "reference" (one batch of ``calib_images`` training
    #: images with the linear-training augmentation, as the reference code), "percentile"
    #: (``calib_percentile`` per point), "mse" (the range minimising quantization MSE per point;
    #: ours, the default)
    calibration: str | None = None
    #: the eval resize (test transform): "bilinear" (ours) or "bicubic" (the reference)
    interpolation: str | None = None
    #: "standard" or "reference" (its CIFAR-10 std); None: what the checkpoint was pretrained with
    normalization: str | None = None
    #: the quantizer's rounding, "reciprocal" or "divide"; None: the checkpoint's own
    rounding: str | None = None
    calib_percentile: float = 99.99
    #: "fp": ranges recorded on the FP network (the paper); "quantized": on the network whose
    #: weights are already quantized at the target bit-width (an ablation)
    calib_weights: str = "fp"
    #: "bn" (ours): a parameter-free BatchNorm on the features before the linear layer; "linear" (the paper)
    probe: str | None = None
    knn_k: int = 200
    knn_t: float = 0.1
    seed: int = 0
    data_root: str | None = None
    allow_download: bool = False
    max_samples: int | None = None
    device: str = "auto"
    num_workers: int = 0
    #: "calibrate" (the paper's PTQ), "adaround" (learned rounding per layer) or "brecq" (per
    #: residual block, Fisher-weighted); reconstruction runs after the ranges are calibrated
    ptq: str = "calibrate"
    #: reconstruction images (a seeded subset of the training split, test transform) and Adam
    #: iterations per unit
    ptq_images: int = 1024
    ptq_iters: int = 2000
    #: brecq only: also learn every activation point's step size (LSQ-style) in a second pass
    brecq_learn_act: bool = False
    #: per-layer bits for a budget (ssql_core.mixed_precision.autobit.AutobitConfig, e.g. {"budget_bits": 4.0}):
    #: the chosen configuration is evaluated as one more row
    autobit: dict[str, Any] | None = None

    def fill_from_preset(self) -> EvalConfig:
        """Give every field left None the preset's value (EVAL_PRESETS); the one place that does."""
        if self.preset not in EVAL_PRESETS:
            raise ConfigError("preset", f"must be one of {sorted(k for k in EVAL_PRESETS if k)} or null, got {self.preset!r}")
        for name, value in EVAL_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def validate(self) -> EvalConfig:
        from ssql_core.bitconfig import parse_bits_spec
        from ssql_core.data import check_dataset_name

        if not isinstance(self.bits, (list, tuple)) or not self.bits:
            raise ConfigError("bits", "give at least one bit-width, e.g. ['fp', '4w4a'] (or a per-layer map)")
        for b in self.bits:
            try:
                parse_bits_spec(b)
            except ValueError as e:
                raise ConfigError("bits", str(e)) from None
        if self.autobit is not None:
            from ssql_core.mixed_precision.autobit import AutobitConfig

            self.autobit = AutobitConfig.from_dict(self.autobit).validate().to_dict()
        self.fill_from_preset()
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError("interpolation", f"must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.normalization is not None and self.normalization not in TRAINING_BEHAVIOURS["normalization"]:
            raise ConfigError("normalization", f"must be one of {list(TRAINING_BEHAVIOURS['normalization'])} or null, "
                              f"got {self.normalization!r}")
        if self.rounding is not None and self.rounding not in QUANT_BEHAVIOURS["rounding"]:
            raise ConfigError("rounding", f"must be one of {list(QUANT_BEHAVIOURS['rounding'])} or null, got {self.rounding!r}")
        if self.protocol not in ("linear", "knn"):
            raise ConfigError("protocol", f"must be 'linear' or 'knn', got {self.protocol!r}")
        if self.path not in ("cached", "augmented"):
            raise ConfigError("path", f"must be 'cached' or 'augmented', got {self.path!r}")
        if self.dataset is not None:
            check_dataset_name(self.dataset, self.data_root, self.allow_download)
        _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_range("batch_size", self.batch_size, 1, MAX_BATCH)
        _check_range("lr", self.lr, 1e-8, 1000.0, float)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0, float)
        _check_range("momentum", self.momentum, 0.0, 0.9999, float)
        check_milestones("lr_milestones", self.lr_milestones)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("calib_images", self.calib_images, 1, 10**7)
        if self.calibration not in CALIBRATIONS:
            raise ConfigError("calibration", f"must be one of {list(CALIBRATIONS)}, got {self.calibration!r}")
        _check_range("calib_percentile", self.calib_percentile, 50.0, 100.0, float)
        if self.calib_weights not in ("fp", "quantized"):
            raise ConfigError("calib_weights", f"must be 'fp' or 'quantized', got {self.calib_weights!r}")
        if self.probe not in PROBES:
            raise ConfigError("probe", f"must be one of {list(PROBES)}, got {self.probe!r}")
        _check_range("knn_k", self.knn_k, 1, 10**5)
        _check_range("knn_t", self.knn_t, 1e-4, 10.0, float)
        if self.max_samples is not None:
            _check_range("max_samples", self.max_samples, 2, 10**9)
        if self.ptq not in PTQ_METHODS:
            raise ConfigError("ptq", f"must be one of {list(PTQ_METHODS)}, got {self.ptq!r}")
        _check_range("ptq_images", self.ptq_images, 1, PTQ_MAX_IMAGES)
        _check_range("ptq_iters", self.ptq_iters, 1, PTQ_MAX_ITERS)
        if not isinstance(self.brecq_learn_act, bool):
            raise ConfigError("brecq_learn_act", f"must be true or false, got {self.brecq_learn_act!r}")
        if self.brecq_learn_act and self.ptq != "brecq":
            raise ConfigError("brecq_learn_act", f"learns activation steps in BRECQ's second pass: set ptq to 'brecq' (got {self.ptq!r})")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return _from_dict(cls, d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(unknown[0], f"unknown option; accepted: {sorted(names)}")
    obj = cls(**d)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if f.name in ("w_bits", "a_bits", "lr_milestones") and isinstance(v, list):
            setattr(obj, f.name, tuple(v))
    return obj
