"""What a run will cost before it runs: FLOPs, device-hours and peak memory from its config.

The backbone is built on PyTorch's ``meta`` device (no memory, no compute) and run once under
``torch.utils.flop_counter.FlopCounterMode`` at the run's image size: the forward FLOPs of one
image (2 per multiply-add), the parameter count and the activation elements one image leaves for
the backward pass. A training step costs about three forwards (forward + backward) per pass;
quantized methods (SSQL) run an FP and a quantized pass per view. Device-hours are the run's
FLOPs over a device's sustained FLOP/s, which the service measures per device kind (decision 014);
the library takes it as an argument. Rough by construction (data loading, augmentation, kernel
efficiency per layer shape are not modelled): the service records each job's estimate next to its
actual device-time so the error is known.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

#: training images per split of the named datasets (imagefolder: unknown until read)
TRAIN_IMAGES = {"digits": 1442, "synthetic": 512, "fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000,
                "cifar100": 50_000}  # fmt: skip
TEST_IMAGES = {"digits": 355, "synthetic": 512, "fashion_mnist": 10_000, "mnist": 10_000, "cifar10": 10_000,
               "cifar100": 10_000}  # fmt: skip
#: forward + backward of one pass, in forwards
TRAIN_PASS = 3.0
#: bytes kept per parameter while training: fp32 weights, gradients, SGD momentum, and the
#: quantizers' scales and fake-quantized copies (a margin)
PARAM_BYTES = 4 * 4
#: activations stored for the backward pass, per activation element (fp32, plus its gradient)
ACT_BYTES = 4 * 2


@dataclass(frozen=True)
class Profile:
    """One backbone at one image size: forward GFLOPs per image, parameters, activation elements."""

    gflops: float
    params: int
    activations: int


@lru_cache(maxsize=256)
def profile(backbone: str, image_size: int, width: float = 1.0, stem: str = "imagenet") -> Profile:
    """Counted on the meta device: milliseconds, no memory, exact for the layers PyTorch knows."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssql_core.models import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone, stem=stem, width=width).eval()  # one image: no batch statistics
        x = torch.empty(1, 3, image_size, image_size)
    count = [0]

    def keep(_m: Any, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            count[0] += out.numel()

    hooks = [m.register_forward_hook(keep) for m in model.modules() if not list(m.children())]
    try:
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return Profile(gflops=fc.get_total_flops() / 1e9, params=sum(p.numel() for p in model.parameters()),
                   activations=count[0])  # fmt: skip


@dataclass(frozen=True)
class Estimate:
    """A job's estimated cost: total PFLOPs, device-hours at ``device_tflops``, peak memory per device."""

    pflops: float
    device_hours: float
    peak_memory_gb: float
    images: int
    device_tflops: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in asdict(self).items()}


def _images(dataset: str | None, max_samples: int | None, table: dict[str, int]) -> int | None:
    n = table.get(dataset or "")
    if n is None:
        return max_samples
    return min(n, max_samples) if max_samples else n


def _stem(config: dict[str, Any], image_size: int) -> str:
    stem = config.get("stem") or "auto"
    return ("cifar" if image_size < 64 else "imagenet") if stem == "auto" else stem


def estimate(kind: str, config: dict[str, Any], device_tflops: float, source_config: dict[str, Any] | None = None,
             quantized: bool = True) -> Estimate | None:
    """The cost of a job of ``kind`` with a validated ``config`` (a pretrain's, or the job's own
    with its pretrain's ``source_config`` for the backbone). None when the image count is
    unknown (an image folder without ``max_samples``). ``quantized``: the method trains an FP
    and a quantized pass per view (SSQL); ``device_tflops``: sustained TFLOP/s of one device."""
    arch = config if kind == "pretrain" else (source_config or {})
    size = int(arch.get("image_size") or 32)
    prof = profile(str(arch.get("backbone") or "resnet18"), size, float(arch.get("width") or 1.0), _stem(arch, size))
    dataset = config.get("dataset") or arch.get("dataset")
    train = _images(dataset, config.get("max_samples"), TRAIN_IMAGES)
    if train is None:
        return None
    test = _images(dataset, None, TEST_IMAGES) or train // 5
    epochs = int(config.get("epochs") or 1)
    batch = int(config.get("batch_size") or 256)
    devices = int(config.get("devices") or 1) if kind == "pretrain" else 1
    passes_per_image = 1.0  # forwards of one image (backbone), per epoch
    act_per_image = 1.0  # images' activations held at once, per batch image
    if kind == "pretrain":
        per_view = 2.0 if quantized else 1.0
        passes_per_image = 2 * per_view * TRAIN_PASS  # two views
        act_per_image = 2 * per_view
        images = train * epochs
    elif kind == "finetune":
        passes_per_image = TRAIN_PASS
        images = train * epochs + train + test  # training, calibration and the test pass (a margin)
    elif kind == "distill":
        passes_per_image = 1.0 + TRAIN_PASS  # the teacher's forward, the student's forward + backward
        act_per_image = 2.0
        images = train * epochs
    else:  # eval: features of the train and test split once per bit-width (the probe is small)
        bits = config.get("bits") or ["fp"]
        autobit = config.get("autobit")
        images = (train + test) * (len(bits) + (autobit is not None))
        act_per_image = 0.0  # no backward through the backbone
        if autobit is not None:  # autobit's sensitivity, in forwards of one image
            images += _autobit_forwards(autobit, arch, size, train, "fp" in bits)
            act_per_image = 2.0 if autobit.get("sensitivity", "hessian") == "hessian" else 0.0
    flops = prof.gflops * 1e9 * passes_per_image * images
    seconds = flops / (device_tflops * 1e12)
    per_device_batch = math.ceil(batch / devices)
    memory = prof.params * PARAM_BYTES + per_device_batch * prof.activations * ACT_BYTES * max(act_per_image, 0.5)
    return Estimate(pflops=flops / 1e15, device_hours=seconds / 3600.0, peak_memory_gb=memory / 2**30,
                    images=images, device_tflops=device_tflops)  # fmt: skip


def _autobit_forwards(autobit: dict[str, Any], arch: dict[str, Any], size: int, train: int, has_fp: bool) -> int:
    """Forwards of one image that autobit's sensitivity costs (ssql_core.mixed_precision.sensitivity): Hutchinson
    takes a gradient with its graph and one Hessian-vector product per sample (about two training
    passes each), plus the FP features of a probe when the evaluation has no ``fp`` row; the
    quantization error one forward per layer and candidate."""
    n = int(autobit.get("images") or 256)
    if autobit.get("sensitivity", "hessian") == "hessian":
        return int(n * (1 + int(autobit.get("samples") or 16)) * 2 * TRAIN_PASS) + (0 if has_fp else train)
    layers = _weight_layers(str(arch.get("backbone") or "resnet18"), _stem(arch, size))
    return n * (1 + layers * len(autobit.get("candidates") or (2, 3, 4, 6, 8)))


@lru_cache(maxsize=64)
def _weight_layers(backbone: str, stem: str) -> int:
    import torch

    from ssql_core.bitconfig import configurable_layers
    from ssql_core.models import build_backbone

    with torch.device("meta"):
        return len(configurable_layers(build_backbone(backbone, stem=stem)))
