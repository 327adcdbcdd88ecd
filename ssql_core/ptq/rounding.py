"""Learned integers as a layer's weight, and a reconstruction as a whole applied to a backbone.

A :class:`LearnedRounding` is set as a quant point's ``weight_override``
(:func:`ssql_core.qnn._quant_weight`): in QUANT mode the layer then computes with
``ints * scale``, ``scale`` being PSQ's per-channel scale of its (unchanged) FP weight. Export
(:func:`ssql_core.export.quantized.quantize_backbone`) stores these integers instead of nearest
rounding's; everything else in the packed file is as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.bitconfig import MixedBits, as_bits, resolve
from ssql_core.bits import BitWidth, parse_bits
from ssql_core.qnn import FIXED8, act_points, weight_points
from ssql_core.quant import weight_int_range, weight_scale


class LearnedRounding:
    """Fixed integers of one layer at ``bits`` on the PSQ grid of its FP weight."""

    def __init__(self, ints: Tensor, bits: int) -> None:
        self.ints = ints.to(torch.int8)
        self.bits = int(bits)

    def __call__(self, m: nn.Module, bits: int | Tensor) -> Tensor:
        if int(bits) != self.bits:
            raise RuntimeError(f"integers learned at {self.bits} bits used at {int(bits)} bits")
        scale = weight_scale(m.weight, self.bits)
        if self.ints.device != scale.device:
            self.ints = self.ints.to(scale.device)
        return (self.ints.float() * scale).to(m.weight.dtype)


def nearest_ints(w: Tensor, bits: int) -> Tensor:
    """PSQ's own integers (round half to even of ``w * (1/s)``), as export computes them."""
    w = w.detach().float()
    scale = weight_scale(w, bits)
    qmin, qmax = weight_int_range(bits, w)
    return torch.clamp(torch.round(w * (1.0 / scale)), qmin.to(w.device), qmax.to(w.device)).to(torch.int8)


def layer_bits(module: nn.Module, bits: BitWidth | MixedBits) -> int:
    """The weight bits a quant point runs at for the file ``bits`` (the stem stays at 8; a
    per-layer configuration gives each layer its own)."""
    if isinstance(bits, MixedBits):
        return bits.by_module[module]
    return 8 if getattr(module, "role", None) == FIXED8 else int(bits.w or 8)


@dataclass
class Reconstruction:
    """The result of one reconstruction at one bit-width: what the quantized model computes
    besides its FP weights (learned integers per weight point, every activation range)."""

    method: str
    bits: str
    ints: dict[str, Tensor] = field(default_factory=dict)
    #: activation point -> [lo, hi] after reconstruction (learned when ``learn_act``)
    ranges: dict[str, Tensor] = field(default_factory=dict)
    #: per unit: name, loss with nearest rounding and with the learned one, which was kept, seconds
    units: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: the per-layer map when ``bits`` is a configuration's label (``ssql_core.bitconfig``)
    bit_config: dict[str, str] | None = None

    def to_state(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back)."""
        return {"method": self.method, "bits": self.bits, "ints": dict(self.ints), "ranges": dict(self.ranges),
                "units": list(self.units), "settings": dict(self.settings), "seconds": self.seconds,
                **({"bit_config": dict(self.bit_config)} if self.bit_config is not None else {})}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Reconstruction:
        return cls(method=str(d["method"]), bits=str(d["bits"]), ints=dict(d["ints"]), ranges=dict(d["ranges"]),
                   units=list(d.get("units", [])), settings=dict(d.get("settings", {})), seconds=float(d.get("seconds", 0.0)),
                   bit_config=dict(d["bit_config"]) if d.get("bit_config") is not None else None)

    def bits_for(self, backbone: nn.Module) -> BitWidth | MixedBits:
        """What the integers were learned at, for ``backbone``."""
        return resolve(self.bit_config, backbone) if self.bit_config is not None else parse_bits(self.bits)

    def summary(self) -> dict[str, Any]:
        """What a result row / manifest says about it (no tensors)."""
        kept = sum(u.get("kept") == "learned" for u in self.units)
        return {"method": self.method, **self.settings, "units": len(self.units), "units_learned": kept,
                "seconds": round(self.seconds, 3)}


def set_rounding(backbone: nn.Module, ints: dict[str, Tensor], bits: Any) -> None:
    """Make the weight points named in ``ints`` compute with those integers at ``bits``."""
    b = as_bits(bits, backbone)
    points = weight_points(backbone)
    for name, t in ints.items():
        if name not in points:
            raise ValueError(f"learned integers for {name!r}, which this backbone does not have")
        m = points[name]
        if tuple(t.shape) != tuple(m.weight.shape):
            raise ValueError(f"learned integers for {name} have shape {tuple(t.shape)}, the weight {tuple(m.weight.shape)}")
        nb = layer_bits(m, b)
        lo, hi = -(2 ** (nb - 1)), 2 ** (nb - 1) - 1
        if int(t.min()) < lo or int(t.max()) > hi:
            raise ValueError(f"learned integers for {name} leave the {nb}-bit grid [{lo}, {hi}]")
        m.__dict__["weight_override"] = LearnedRounding(t.to(m.weight.device), nb)


def apply_reconstruction(backbone: nn.Module, rec: Reconstruction) -> None:
    """The quantized model of ``rec``: its integers and its activation ranges."""
    set_rounding(backbone, rec.ints, rec.bits_for(backbone))
    points = act_points(backbone)
    for name, rng in rec.ranges.items():
        points[name].lo.fill_(float(rng[0]))
        points[name].hi.fill_(float(rng[1]))


def clear_rounding(backbone: nn.Module) -> None:
    """Back to PSQ's nearest rounding everywhere (and no activation override)."""
    for m in backbone.modules():
        m.__dict__.pop("weight_override", None)
        m.__dict__.pop("act_override", None)


def current_ranges(backbone: nn.Module) -> dict[str, Tensor]:
    return {n: torch.stack([p.lo, p.hi]).detach().float().cpu().clone() for n, p in act_points(backbone).items()}
