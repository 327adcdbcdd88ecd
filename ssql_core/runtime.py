"""Device choice, seeding and the autocast / memory-format policy shared by train and eval."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def device_kind(name: str) -> str:
    """What a run's device is, for throughput records: the GPU's model name, or ``cpu: <model>``."""
    device = resolve_device(name)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark reports; ``platform`` otherwise."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def peak_memory() -> dict[str, float | None]:
    """This process's peak memory so far, in GiB (as cost estimates state ``peak_memory_gb``):
    ``device_gb``, the CUDA caching allocator's peak of tensors on any of its GPUs
    (``torch.cuda.max_memory_allocated``), None when this process used no GPU (DDP ranks run in
    processes of their own); ``rss_gb``, the peak resident set size of this process or of its
    largest finished child (data-loader workers, CPU DDP ranks), which includes the Python and
    torch runtime itself."""
    import resource
    import sys

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    device = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return {"device_gb": None if device is None else round(device, 4), "rss_gb": round(rss * unit / 2**30, 4)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA; full precision on CPU (bf16 there is slower and less exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(device: torch.device, requested: bool) -> bool:
    """channels_last only on CUDA. On the CPU, PyTorch's NHWC convolution kernels corrupted the
    heap (glibc "double free or corruption", SIGABRT) on an AMD EPYC machine for small ResNets
    (4-channel convolutions, one thread); a plain PyTorch model reproduced it, and the Intel CPU
    this project is developed on never showed it, so no channel count can be measured safe here.
    Contiguous memory costs the CPU nothing measurable (docs/RESULTS.md, "channels_last on the CPU")."""
    return requested and device.type == "cuda"


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compile_modules(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` each top-level submodule of a method in place (backbone, heads, target
    encoders): ``state_dict`` keeps its names, the step's Python (bit draw, mode switches) stays
    eager, and a quantized pass reads its bit-widths from 0-dim tensors, so one graph per quant
    mode (FP, record, quantized) serves every bit pair (ssql_core.qnn)."""
    for child in model.children():
        child.compile(**options)
    return model
