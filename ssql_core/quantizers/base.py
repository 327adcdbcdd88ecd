"""The one interface every quantizer implements, and the statistics they initialise from.

A :class:`Quantizer` fake-quantizes one tensor (a layer's weight or an activation) at a fixed
bit-width: ``forward(x)`` returns ``x_hat`` with the shape and the *scale* of ``x`` (so BN
running statistics and residual sums stay valid), and its learnable quantization parameters are
its own ``nn.Parameter`` s (trained with their own learning rate by the distiller).
``export(x)`` describes the integer grid behind ``x_hat`` so a packing step can store integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: guards divisions by a degenerate (empty / dead) range
EPS = 1e-8


@dataclass
class TensorStats:
    """Running min, max and mean |x| of a tensor stream (what data-dependent inits need)."""

    lo: float = float("inf")
    hi: float = float("-inf")
    abs_sum: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, x: Tensor) -> TensorStats:
        s = cls()
        s.update(x)
        return s

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach().float()
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())
        self.abs_sum += x.abs().sum().item()
        self.count += x.numel()

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / max(self.count, 1)

    @property
    def max_abs(self) -> float:
        return max(abs(self.lo), abs(self.hi), EPS)


def levels(bits: int, signed: bool) -> int:
    """Positive levels of a clip-then-round grid: ``2^b - 1`` on [0, c], ``2^(b-1) - 1`` on [-c, c]."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


class Quantizer(nn.Module):
    """Fake quantizer of one tensor at ``bits`` (see module docstring)."""

    family: ClassVar[str] = ""
    #: "weight" or "act": which tensor kind this class quantizes
    kind: ClassVar[str] = ""

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8, got {bits}")
        self.bits = int(bits)
        self.signed = bool(signed)

    def init_from(self, stats: TensorStats) -> None:  # noqa: B027 - optional override
        """Data-dependent initialisation (from the weight itself, or calibration activations)."""

    def export(self, x: Tensor) -> dict[str, Any]:
        """The integer grid of ``forward(x)``: ``x_hat == scale * (int - zero_point)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def grid_dict(ints: Tensor, scale: Tensor, zero_point: float | Tensor, storage_bits: int, signed: bool) -> dict[str, Any]:
    """The export record: integer values, scale (scalar or per output channel), zero point."""
    return {
        "int": ints.to(torch.int32),
        "scale": torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1),
        "zero_point": torch.as_tensor(zero_point, dtype=torch.float32).detach().reshape(-1),
        "storage_bits": int(storage_bits),
        "signed": bool(signed),
    }


def act_grid_dict(scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> dict[str, Any]:
    """Export record of an activation quantizer: ``a_hat = scale * (clamp(round(a/scale) + zp) - zp)``."""
    return {
        "scale": torch.as_tensor(scale, dtype=torch.float32).detach().reshape(()),
        "zero_point": torch.as_tensor(zero_point, dtype=torch.float32).detach().reshape(()),
        "qmin": int(qmin),
        "qmax": int(qmax),
    }
