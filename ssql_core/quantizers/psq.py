"""PSQ (SPEC 2) behind the quantizer interface: min-max ranges, nothing learned, STE.

Weights reuse :mod:`ssql_core.quant` exactly (per-channel symmetric, recomputed every step).
Activations quantize with a running min-max range: each training batch's range is folded into an
exponential moving average (momentum 0.1, as BN) that is used in training and at test time, so the
deployed model has fixed ranges; the average starts from the calibration range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ssql_core.quant import activation_qparams, quantize_activation, quantize_weight, weight_to_int
from ssql_core.quantizers.base import Quantizer, TensorStats, act_grid_dict, grid_dict


class PSQWeight(Quantizer):
    family, kind = "psq", "weight"

    def __init__(self, bits: int, signed: bool = True) -> None:
        super().__init__(bits, True)

    def forward(self, w: Tensor) -> Tensor:
        return quantize_weight(w, self.bits)

    def export(self, w: Tensor) -> dict[str, Any]:
        ints, scale = weight_to_int(w, self.bits)
        return grid_dict(ints, scale, 0.0, self.bits, True)


class PSQAct(Quantizer):
    family, kind = "psq", "act"

    def __init__(self, bits: int, signed: bool = False, momentum: float = 0.1) -> None:
        super().__init__(bits, signed)
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(1.0))

    def init_from(self, stats: TensorStats) -> None:
        self.lo.fill_(stats.lo)
        self.hi.fill_(stats.hi)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.lo.mul_(1 - m).add_(x.detach().min().float(), alpha=m)
                self.hi.mul_(1 - m).add_(x.detach().max().float(), alpha=m)
        return quantize_activation(x, self.bits, self.lo, self.hi)

    def export(self, x: Tensor | None = None) -> dict[str, Any]:
        scale, zero, qmax = activation_qparams(self.bits, self.lo, self.hi)
        return act_grid_dict(scale, zero, 0, int(qmax.item()))
