"""Activation calibration beyond min-max: how each quant point's ``[lo, hi]`` is chosen.

Forward hooks on the activation points see every calibration batch (the network runs in FP, or,
for the ``calib_weights="quantized"`` ablation, with its weights already quantized at the target
bit-width and activations unquantized). Per point they keep the exact min and max and a seeded
random sample of values, from which:

* ``minmax``: ``[min, max]`` (SPEC 6; the union over batches, as RECORD mode);
* ``percentile``: the ``(100-p)``-th and ``p``-th percentiles of the sampled values;
* ``mse``: ``lo = min`` and the ``hi`` in a 100-point grid over ``(lo, max]`` that minimises the
  mean squared error between the sampled values and their fake-quantized copies at the point's
  bit-width (8 for the stem).

Percentiles and MSE are computed on at most ``SAMPLE_PER_BATCH`` values of each batch per point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.bitconfig import MixedBits, as_bits, point_act_bits
from ssql_core.bits import BitWidth
from ssql_core.qnn import ActQuant, Mode, QuantContext, act_points
from ssql_core.quant import quantize_activation
from ssql_core.runtime import to_input

SAMPLE_PER_BATCH = 2**18
MSE_GRID = 100


@dataclass
class PointStats:
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[Tensor] = field(default_factory=list)

    def values(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0)


@torch.no_grad()
def collect(backbone: nn.Module, ctx: QuantContext, images: Iterable[Any], device: torch.device,
            bits: BitWidth | MixedBits | None = None, keep_samples: bool = True, seed: int = 0) -> tuple[dict[str, PointStats], int]:
    """Per-point statistics over ``images`` (batches ``(x, y)``); ``bits`` set: weights quantized."""
    backbone.eval()
    points = act_points(backbone)
    stats = {name: PointStats() for name in points}
    g = torch.Generator().manual_seed(seed)

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            x = out.detach().float().reshape(-1)
            s = stats[name]
            lo, hi = torch.aminmax(x)
            s.lo, s.hi = min(s.lo, float(lo)), max(s.hi, float(hi))
            if keep_samples:
                if x.numel() > SAMPLE_PER_BATCH:
                    x = x[torch.randint(x.numel(), (SAMPLE_PER_BATCH,), generator=g).to(x.device)]
                s.samples.append(x.cpu())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in points.items()]
    prev = (ctx.mode, ctx.quant_w, ctx.quant_a)
    n = 0
    try:
        if bits is not None and not bits.is_fp:
            ctx.set_bits(bits)
            ctx.mode, ctx.quant_w, ctx.quant_a = Mode.QUANT, True, False
        else:
            ctx.mode = Mode.FP
        for x, *_ in images:
            backbone(to_input(x, device, False))
            n += len(x)
    finally:
        ctx.mode, ctx.quant_w, ctx.quant_a = prev
        for h in handles:
            h.remove()
    return stats, n


def mse_range(values: Tensor, lo: float, hi: float, bits: int, rounding: str = "reciprocal") -> tuple[float, float]:
    """``(lo, hi*)``: the upper bound on a grid over ``(lo, hi]`` with the least quantization MSE."""
    if values.numel() == 0 or not hi > lo:
        return lo, hi
    best, best_hi = float("inf"), hi
    lo_t = torch.tensor(lo)
    for frac in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist():
        cand = lo + frac * (hi - lo)
        err = (quantize_activation(values, bits, lo_t, torch.tensor(cand), rounding) - values).pow(2).mean().item()
        if err < best:
            best, best_hi = err, cand
    return lo, best_hi


def choose_range(s: PointStats, method: str, bits: int, percentile: float, rounding: str = "reciprocal") -> tuple[float, float]:
    """The ``[lo, hi]`` that ``method`` picks from one point's statistics."""
    if method in ("minmax", "reference"):
        return s.lo, s.hi
    v = s.values()
    if method == "percentile":
        if v.numel() == 0:
            return s.lo, s.hi
        q = torch.quantile(v.double(), torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float64))
        return float(q[0]), float(q[1])
    if method == "mse":
        return mse_range(v, s.lo, s.hi, bits, rounding)
    raise ValueError(f"unknown calibration method {method!r}")


def calibrate_ranges(backbone: nn.Module, ctx: QuantContext, images: Iterable[Any], device: torch.device, bits: Any,
                     method: str = "minmax", percentile: float = 99.99, quantized_weights: bool = False,
                     seed: int = 0) -> int:
    """Set every activation point's range for a quantized run at ``bits`` (a bit-width or a
    per-layer configuration: each point's MSE range is chosen at its own bits); returns the image count."""
    b = as_bits(bits, backbone)
    stats, n = collect(backbone, ctx, images, device, b if quantized_weights else None,
                       keep_samples=method in ("percentile", "mse"), seed=seed)
    for name, point in act_points(backbone).items():
        point_bits = point_act_bits(name, point, b)
        lo, hi = choose_range(stats[name], method, point_bits, percentile, ctx.rounding)
        _set(point, lo, hi)
    return n


def _set(point: ActQuant, lo: float, hi: float) -> None:
    point.lo.fill_(lo)
    point.hi.fill_(hi)


@torch.no_grad()
def zero_rounding(backbone: nn.Module, ctx: QuantContext, images: Iterable[Any], device: torch.device,
                  bits: Any) -> dict[str, dict[str, float]]:
    """Per activation point, with the ranges currently set: the share of non-zero FP activations
    that the ``bits`` grid rounds to zero, and the mean activation with the weights quantized at
    ``bits`` over the mean in FP (above 1: quantized weights inflate the activations)."""
    b = as_bits(bits, backbone)
    points = act_points(backbone)
    fp_stats, _ = collect(backbone, ctx, images, device, None, seed=1)
    q_stats, _ = collect(backbone, ctx, images, device, b, seed=1)
    out = {}
    for name, point in points.items():
        v = fp_stats[name].values()
        qv = q_stats[name].values()
        nz = v[v != 0]
        point_bits = point_act_bits(name, point, b)
        zeroed = (quantize_activation(nz, point_bits, point.lo.cpu(), point.hi.cpu(), ctx.rounding) == 0).float().mean().item() if nz.numel() else 0.0
        out[name] = {"nonzero_to_zero": zeroed, "inflation": (qv.abs().mean() / v.abs().mean().clamp_min(1e-12)).item()}
    return out
