"""Turn a distilled student into the project's packed checkpoint (``ssql_core.export`` format).

The packed format stores, per weight, ``b``-bit integers with per-channel scales and zero point 0,
and, per activation point, a range ``[lo, hi]`` read with PSQ's asymmetric rule. A student maps
onto it when its weight grid is ``scale * int`` at ``b`` bits: the ``psq`` and ``lsq`` families.
DoReFa-style weights (``pact``, ``dorefa``, ``ewgs``) sit on odd multiples of ``scale`` (no zero
level), which needs ``b + 1`` bits: those students are refused with a reason.

Activations: PSQ students carry their ranges; for the others an unsigned grid ``s * [0, n]`` is
the range ``[0, n s]`` (equal up to float rounding of the scale). Signed grids (MobileNetV2 block
outputs) have no asymmetric equivalent and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssql_core.export.format import write_quantized
from ssql_core.export.quantized import QuantizedBackbone, QuantizedWeight, arch_of
from ssql_core.qnn import ActQuant, QConv2d, QLinear
from ssql_core.quantizers import INT_WEIGHT_FAMILIES
from ssql_core.quantizers.psq import PSQAct


def student_to_quantized(student: nn.Module) -> QuantizedBackbone:
    """The packed-format description of ``student`` (a :class:`ssql_core.distill.Student`)."""
    if student.family not in INT_WEIGHT_FAMILIES:
        raise ValueError(
            f"a {student.family!r} student's weights lie on odd multiples of the scale (no zero level): "
            f"they need {student.bits.w + 1} bits, the packed format stores {student.bits.w}; "
            f"distil with one of {list(INT_WEIGHT_FAMILIES)} to export"
        )
    backbone = student.backbone
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in backbone.state_dict().items()}
    out = QuantizedBackbone(arch=arch_of(backbone), bits=student.bits)
    with torch.no_grad():
        for name, m in backbone.named_modules():
            b = getattr(m, "_qat", None)
            if b is None:
                continue
            q = b.quantizer
            if isinstance(m, (QConv2d, QLinear)):
                g = q.export(m.weight)
                ints = g["int"].to(torch.int8)
                out.weights[f"{name}.weight"] = QuantizedWeight(ints, g["scale"].float().cpu(), q.bits, m.role)
                if m.bias is not None:
                    out.fp[f"{name}.bias"] = state[f"{name}.bias"]
            elif isinstance(m, ActQuant):
                out.ranges[name] = (_act_range(name, q), q.bits, m.role)
    out.fp.update({k: v for k, v in state.items() if k not in out.weights and k not in out.fp})
    return out


def _act_range(name: str, q: Any) -> torch.Tensor:
    if isinstance(q, PSQAct):
        return torch.stack([q.lo, q.hi]).detach().float().cpu()
    e = q.export()
    if e["qmin"] < 0:
        raise ValueError(f"activation point {name} has a signed symmetric grid: the packed format's ranges are asymmetric")
    return torch.stack([torch.tensor(0.0), e["scale"].float() * e["qmax"]]).cpu()


def export_student(student_path: str | Path, out_path: str | Path) -> Path:
    """Write ``student.pt`` as a packed classifier checkpoint (backbone + FP head) at its bits."""
    from ssql_core.distill.student import load_student

    state, student = load_student(student_path)
    q = student_to_quantized(student)
    head = {k: v.detach().float().cpu() for k, v in student.head.state_dict().items()}
    info = {"source": {"kind": "distilled_student", "checkpoint": Path(student_path).name, "quantizer": student.family,
                       "distill_config": state.get("config"), "pretrain_config": state.get("pretrain_config")},
            "evaluation": {"result": state.get("result")}}
    return write_quantized(out_path, q, head, info)
