"""Reconstruction-based post-training quantization: AdaRound and BRECQ (docs/decisions/016).

``ptq="calibrate"`` is the paper's PTQ (min-max or another range rule, nearest rounding).
``"adaround"`` and ``"brecq"`` additionally learn which way each weight rounds on PSQ's own grid;
the result is a :class:`Reconstruction` (integers per weight point, every activation range) that
evaluation applies in memory and export writes as the packed integers of the usual format.
"""

from ssql_core.ptq.reconstruct import ReconConfig, ReconstructionDiverged, plan_units, reconstruct
from ssql_core.ptq.rounding import (
    LearnedRounding,
    Reconstruction,
    apply_reconstruction,
    clear_rounding,
    nearest_ints,
    set_rounding,
)

__all__ = ["LearnedRounding", "ReconConfig", "Reconstruction", "ReconstructionDiverged", "apply_reconstruction",
           "clear_rounding", "nearest_ints", "plan_units", "reconstruct", "set_rounding"]
