"""EWGS (Lee et al. 2021): element-wise gradient scaling instead of the straight-through estimator.

The tensor is normalised by a learnable interval bound ``u`` and scaled to level units,
``v = clip(x / u, 0, 1) * n`` (activations; ``[-1, 1]`` and ``n = 2^(b-1) - 1`` if signed) or
``v = clip((w / u + 1) / 2, 0, 1) * n`` (weights, ``n = 2^b - 1``), then ``q = round(v)``.
Forward is plain rounding; backward replaces the STE's ``g`` by ``g + delta * |g| * (v - q)``
(``= g (1 + delta sign(g) (v - q))``), the discretisation error measured in the normalised domain
in level units, as the reference code's discretizer does. Gradients reach ``x`` inside the clip
interval (bounds included) and ``u`` through the normalisation and the rescaling.
Output keeps the input's scale: ``u q / n`` (activations), ``u (2q/n - 1)`` (weights: odd
multiples of ``u / n``, ``b + 1`` storage bits).

``delta`` is a buffer: fixed (default 1e-3), or set from a Hutchinson Hessian-trace estimate by
:func:`ssql_core.quantizers.hessian.update_ewgs_deltas` as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.quantizers.base import EPS, Quantizer, TensorStats, act_grid_dict, grid_dict, levels

DEFAULT_DELTA = 1e-3


class _EWGSRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, delta: Tensor) -> Tensor:  # type: ignore[override]
        q = torch.round(v)
        ctx.save_for_backward(v - q, delta)
        return q

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        diff, delta = ctx.saved_tensors
        return g + delta.to(g.dtype) * g.abs() * diff.to(g.dtype), None


def ewgs_round(v: Tensor, delta: Tensor) -> Tensor:
    """``round(v)``; backward ``g + delta * |g| * (v - round(v))``."""
    return _EWGSRound.apply(v, delta)


def clip_inclusive(v: Tensor, lo: float, hi: float) -> Tensor:
    """``clamp(v, lo, hi)`` whose gradient is 1 on ``[lo, hi]`` bounds included, 0 outside."""
    return torch.where((v >= lo) & (v <= hi), v, v.detach().clamp(lo, hi))


class _EWGS(Quantizer):
    family = "ewgs"

    def __init__(self, bits: int, signed: bool = False, delta: float = DEFAULT_DELTA) -> None:
        super().__init__(bits, signed)
        self.u = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("delta", torch.tensor(float(delta)))
        #: set by the Hessian update: keep the last rounded tensor (level units) of the forward
        self.capture = False
        self.captured: Tensor | None = None

    def init_from(self, stats: TensorStats) -> None:
        with torch.no_grad():
            self.u.fill_(stats.max_abs if (self.signed or self.kind == "weight") else max(stats.hi, EPS))

    def _quantize(self, v: Tensor) -> Tensor:
        q = ewgs_round(v, self.delta)
        if self.capture:
            self.captured = q
        return q


class EWGSWeight(_EWGS):
    kind = "weight"

    def __init__(self, bits: int, signed: bool = True, delta: float = DEFAULT_DELTA) -> None:
        super().__init__(bits, True, delta)

    def forward(self, w: Tensor) -> Tensor:
        n = 2**self.bits - 1
        u = self.u.clamp_min(EPS)
        q = self._quantize(clip_inclusive((w.float() / u + 1) / 2, 0.0, 1.0) * n)
        return (u * (2 * q / n - 1)).to(w.dtype)

    def export(self, w: Tensor) -> dict[str, Any]:
        n = 2**self.bits - 1
        u = self.u.detach().clamp_min(EPS)
        q = torch.round(((w.detach().float() / u + 1) / 2).clamp(0, 1) * n)
        return grid_dict(2 * q - n, (u / n).expand(w.shape[0]), 0.0, self.bits + 1, True)


class EWGSAct(_EWGS):
    kind = "act"

    def forward(self, x: Tensor) -> Tensor:
        n = levels(self.bits, self.signed)
        u = self.u.clamp_min(EPS)
        q = self._quantize(clip_inclusive(x.float() / u, -1.0 if self.signed else 0.0, 1.0) * n)
        return (u * q / n).to(x.dtype)

    def export(self, x: Tensor | None = None) -> dict[str, Any]:
        n = levels(self.bits, self.signed)
        return act_grid_dict(self.u.detach().clamp_min(EPS) / n, 0.0, -n if self.signed else 0, n)
