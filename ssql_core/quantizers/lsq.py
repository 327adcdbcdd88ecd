"""LSQ (Esser et al. 2020): a learnable step size ``s`` per tensor.

``v = x / s``, ``x_hat = round(clip(v, -Qn, Qp)) * s`` with ``Qn = 0, Qp = 2^b - 1`` (unsigned
activations) or ``Qn = 2^(b-1), Qp = 2^(b-1) - 1`` (weights, signed activations). Gradients as in
the paper: ``dx_hat/dx = 1`` for ``-Qn < v < Qp`` else 0; ``dx_hat/ds = round(v) - v`` inside,
``-Qn`` at or below, ``Qp`` at or above; the step's gradient is scaled by ``1 / sqrt(N Qp)``,
``N`` = the number of elements of the quantized tensor. Init ``s = 2 mean|x| / sqrt(Qp)``.
Zero point 0, so the integer grid is exactly representable at ``b`` bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.quantizers.base import EPS, Quantizer, TensorStats, act_grid_dict, grid_dict


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, qn: int, qp: int, gscale: float) -> Tensor:  # type: ignore[override]
        step = s.detach().float().clamp_min(EPS)
        v = x.float() / step
        ctx.save_for_backward(v)
        ctx.qn, ctx.qp, ctx.gscale, ctx.s_shape = qn, qp, gscale, s.shape
        return (torch.round(torch.clamp(v, -qn, qp)) * step).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        low, high = v <= -ctx.qn, v >= ctx.qp
        inside = ~(low | high)
        ds = torch.where(inside, torch.round(v) - v, torch.where(low, -float(ctx.qn), float(ctx.qp)))
        g_s = (g.float() * ds).sum() * ctx.gscale
        return g * inside.to(g.dtype), g_s.reshape(ctx.s_shape), None, None, None


class LSQ(Quantizer):
    family = "lsq"

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__(bits, signed)
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step = nn.Parameter(torch.tensor(1.0))

    def init_from(self, stats: TensorStats) -> None:
        with torch.no_grad():
            self.step.fill_(max(2.0 * stats.mean_abs / math.sqrt(self.qp), EPS))

    def forward(self, x: Tensor) -> Tensor:
        gscale = 1.0 / math.sqrt(x.numel() * self.qp)
        return _LSQ.apply(x, self.step, self.qn, self.qp, gscale)

    def _ints(self, x: Tensor) -> Tensor:
        s = self.step.detach().clamp_min(EPS)
        return torch.round(torch.clamp(x.detach().float() / s, -self.qn, self.qp))


class LSQWeight(LSQ):
    kind = "weight"

    def __init__(self, bits: int, signed: bool = True) -> None:
        super().__init__(bits, True)

    def export(self, w: Tensor) -> dict[str, Any]:
        scale = self.step.detach().clamp_min(EPS).expand(w.shape[0])
        return grid_dict(self._ints(w), scale, 0.0, self.bits, True)


class LSQAct(LSQ):
    kind = "act"

    def export(self, x: Tensor | None = None) -> dict[str, Any]:
        return act_grid_dict(self.step.detach().clamp_min(EPS), 0.0, -self.qn, self.qp)
