"""PACT (Choi et al. 2018): activations clipped at a learnable ``alpha``, then uniform levels.

``y = clip(x, 0, alpha)`` (``[-alpha, alpha]`` for a signed tensor), ``x_hat = round(y / s) * s``
with ``s = alpha / (2^b - 1)`` (``alpha / (2^(b-1) - 1)`` signed). Gradients as in the paper:
``dx_hat/dx = 1`` inside the clip range, 0 outside; ``dx_hat/dalpha = 1`` where ``x >= alpha``
(``-1`` where ``x <= -alpha``), 0 inside (the rounding is straight-through). The paper pairs PACT
with DoReFa weights (:class:`ssql_core.quantizers.dorefa.DoReFaWeight`). ``alpha`` starts at the
calibrated activation maximum instead of the paper's 10, which is far above BN-ReLU ranges of a
teacher-initialised student and would waste most levels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.quantizers.base import EPS, Quantizer, TensorStats, act_grid_dict, levels


class _ClipRound(torch.autograd.Function):
    """Clip to ``[lo, alpha]`` and round to ``n`` levels per ``alpha``; PACT gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: int, signed: bool) -> Tensor:  # type: ignore[override]
        a = alpha.detach().float().clamp_min(EPS)
        lo = -a if signed else torch.zeros_like(a)
        y = torch.minimum(torch.maximum(x.float(), lo), a)
        s = a / n
        ctx.save_for_backward(x, a)
        ctx.signed = signed
        return (torch.round(y / s) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, a = ctx.saved_tensors
        above = x >= a
        if ctx.signed:
            below = x <= -a
            inside = ~(above | below)
            g_alpha = (g * above).sum() - (g * below).sum()
        else:
            inside = (x >= 0) & ~above
            g_alpha = (g * above).sum()
        return g * inside.to(g.dtype), g_alpha.reshape(a.shape), None, None


def clip_round(x: Tensor, alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """PACT's fake quantizer for a clip value ``alpha`` (learnable or not)."""
    return _ClipRound.apply(x, alpha, levels(bits, signed), signed)


class PACTAct(Quantizer):
    family, kind = "pact", "act"

    def __init__(self, bits: int, signed: bool = False, alpha: float = 10.0) -> None:
        super().__init__(bits, signed)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def init_from(self, stats: TensorStats) -> None:
        with torch.no_grad():
            self.alpha.fill_(stats.max_abs if self.signed else max(stats.hi, EPS))

    def forward(self, x: Tensor) -> Tensor:
        return clip_round(x, self.alpha, self.bits, self.signed)

    def export(self, x: Tensor | None = None) -> dict[str, Any]:
        n = levels(self.bits, self.signed)
        return act_grid_dict(self.alpha.detach().clamp_min(EPS) / n, 0.0, -n if self.signed else 0, n)
