"""Pluggable quantizers for quantization-aware training (SQAKD, SimSiam-PACT) behind one interface.

A *family* names a weight quantizer and an activation quantizer that are used together:

* ``psq``: the project's min-max STE (SPEC 2), nothing learned;
* ``pact``: learnable activation clip (PACT) with DoReFa weights, as in the PACT paper;
* ``lsq``: learnable step sizes with LSQ's gradient scale;
* ``dorefa``: DoReFa's tanh-normalised weights and clipped activations;
* ``ewgs``: learnable intervals with EWGS's element-wise gradient scaling.
"""

from __future__ import annotations

from typing import Any

from ssql_core.quantizers.base import Quantizer, TensorStats
from ssql_core.quantizers.dorefa import DoReFaAct, DoReFaWeight
from ssql_core.quantizers.ewgs import EWGSAct, EWGSWeight
from ssql_core.quantizers.lsq import LSQAct, LSQWeight
from ssql_core.quantizers.pact import PACTAct
from ssql_core.quantizers.psq import PSQAct, PSQWeight

#: family -> (weight quantizer class, activation quantizer class)
FAMILIES: dict[str, tuple[type[Quantizer], type[Quantizer]]] = {
    "psq": (PSQWeight, PSQAct),
    "pact": (DoReFaWeight, PACTAct),
    "lsq": (LSQWeight, LSQAct),
    "dorefa": (DoReFaWeight, DoReFaAct),
    "ewgs": (EWGSWeight, EWGSAct),
}
QUANTIZER_NAMES: tuple[str, ...] = tuple(FAMILIES)
#: families whose weight grid is ``scale * int`` at ``b`` bits with zero point 0 (PSQ-packable)
INT_WEIGHT_FAMILIES: tuple[str, ...] = ("psq", "lsq")


def build_quantizer(family: str, kind: str, bits: int, signed: bool = False, options: dict[str, Any] | None = None) -> Quantizer:
    """One quantizer of ``family`` for a ``kind`` ("weight" or "act") tensor at ``bits``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown quantizer {family!r}; known: {list(QUANTIZER_NAMES)}")
    cls = FAMILIES[family][0 if kind == "weight" else 1]
    opts = options or {}
    if family == "ewgs" and "delta" in opts:
        return cls(bits, signed, delta=float(opts["delta"]))
    return cls(bits, signed)


__all__ = ["FAMILIES", "INT_WEIGHT_FAMILIES", "QUANTIZER_NAMES", "Quantizer", "TensorStats", "build_quantizer"]
