"""DoReFa-Net (Zhou et al. 2016) quantizers.

Weights: ``t = tanh(w)``, ``w_n = t / (2 max|t|) + 1/2`` in [0, 1], ``q = round(w_n n) / n``
(``n = 2^b - 1``, straight-through), ``w_hat = (2q - 1) * max|w|``. The last factor (detached) is
ours: DoReFa outputs [-1, 1]; keeping the layer's magnitude keeps a teacher-initialised student's
BN running statistics valid (a following BN in train mode is invariant to it). ``max|t|`` is
detached, so ``dw_hat/dw = (1 - tanh(w)^2) * max|w| / max|t|``. The grid is odd multiples of
``max|w| / n`` (no zero), so storing it as integers takes ``b + 1`` bits.

Activations: DoReFa clips to [0, 1]; BN-ReLU activations are not bounded by 1, so the clip value is
the calibrated activation maximum, fixed (not learned: that is what PACT adds).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ssql_core.quantizers.base import EPS, Quantizer, TensorStats, act_grid_dict, grid_dict, levels
from ssql_core.quantizers.pact import clip_round


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with an identity gradient."""
    return _RoundSTE.apply(x)


class DoReFaWeight(Quantizer):
    family, kind = "dorefa", "weight"

    def __init__(self, bits: int, signed: bool = True) -> None:
        super().__init__(bits, True)

    def _levels(self, w: Tensor) -> tuple[Tensor, Tensor, int]:
        t = torch.tanh(w.float())
        m = t.detach().abs().max().clamp_min(EPS)
        n = 2**self.bits - 1
        return t / (2 * m) + 0.5, w.detach().abs().max().float(), n

    def forward(self, w: Tensor) -> Tensor:
        wn, mag, n = self._levels(w)
        q = round_ste(wn * n) / n
        return ((2 * q - 1) * mag).to(w.dtype)

    def export(self, w: Tensor) -> dict[str, Any]:
        wn, mag, n = self._levels(w)
        ints = 2 * torch.round(wn.detach() * n) - n
        scale = (mag / n).expand(w.shape[0])
        return grid_dict(ints, scale, 0.0, self.bits + 1, True)


class DoReFaAct(Quantizer):
    family, kind = "dorefa", "act"

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__(bits, signed)
        self.register_buffer("clip", torch.tensor(1.0))

    def init_from(self, stats: TensorStats) -> None:
        self.clip.fill_(stats.max_abs if self.signed else max(stats.hi, EPS))

    def forward(self, x: Tensor) -> Tensor:
        return clip_round(x, self.clip, self.bits, self.signed)

    def export(self, x: Tensor | None = None) -> dict[str, Any]:
        n = levels(self.bits, self.signed)
        return act_grid_dict(self.clip / n, 0.0, -n if self.signed else 0, n)
