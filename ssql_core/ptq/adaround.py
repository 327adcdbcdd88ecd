"""AdaRound (Nagel et al., ICML 2020): learn, per weight, whether to round down or up.

On the PSQ grid of :mod:`ssql_core.quant` (per-channel scale ``s = max|w_c| / ((2^b-1)/2)``, integers
in ``[-2^(b-1), 2^(b-1)-1]``), a weight is ``s * clamp(floor(w/s) + h(V), qmin, qmax)`` with the
rectified sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``,
``gamma = -0.1``. ``V`` starts where ``h(V)`` equals the fractional part of ``w/s`` (so the soft
weight starts at the FP weight) and is trained against the reconstruction loss plus
``lambda * sum(1 - |2 h(V) - 1|^beta)``, the regularizer that drives every ``h`` to 0 or 1, off for
the first ``warmup`` share of the iterations and with ``beta`` annealed linearly from 20 to 2 after
it (the paper's and the BRECQ code's schedule). The learned integers are ``floor(w/s) + [V >= 0]``:
the scale is PSQ's, untouched, so the packed format stores them as it stores nearest rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssql_core.quant import weight_int_range, weight_scale

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """The learnable rounding of one weight tensor at ``bits``."""

    def __init__(self, w: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        w = w.detach().float()
        scale = weight_scale(w, bits)
        qmin, qmax = weight_int_range(bits, w)
        v = w * (1.0 / scale)  # the quantizer's own x * (1/s)
        floor = torch.floor(v)
        rest = (v - floor).clamp(0.0, 1.0)
        self.register_buffer("scale", scale)
        self.register_buffer("floor", floor)
        self.register_buffer("qmin", qmin.to(w.device))
        self.register_buffer("qmax", qmax.to(w.device))
        # h(V) = rest: V = -log((zeta - gamma) / (rest - gamma) - 1)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_ints(self) -> Tensor:
        return torch.clamp(self.floor + self.h(), self.qmin, self.qmax)

    @torch.no_grad()
    def hard_ints(self) -> Tensor:
        """The learned integers: round up where ``h(V) >= 1/2``, i.e. ``V >= 0``."""
        return torch.clamp(self.floor + (self.v >= 0).float(), self.qmin, self.qmax).to(torch.int8)

    def round_loss(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def weight_for(self, m: nn.Module, bits: int | Tensor) -> Tensor:
        """The soft-rounded weight (the layer's ``weight_override`` while V is learned)."""
        if int(bits) != self.bits:
            raise RuntimeError(f"AdaRound weight learned at {self.bits} bits used at {int(bits)}")
        return (self.soft_ints() * self.scale).to(m.weight.dtype)


class BetaSchedule:
    """The regularizer's exponent: off during ``warmup``, then ``start -> end`` linearly."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        self.iters, self.start, self.end = iters, start, end
        self.begin = int(warmup * iters)

    def active(self, t: int) -> bool:
        return t >= self.begin

    def beta(self, t: int) -> float:
        if t < self.begin:
            return self.start
        rel = (t - self.begin) / max(self.iters - self.begin, 1)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)
