"""The quantized student: a copy of the teacher backbone with trainable quantizers, plus its head.

Layout (SPEC 3 and 8): every block conv and activation point at the target bits with the chosen
quantizer; the stem (first conv and its output) at 8 bits with the same quantizer family; the
pooled feature and the linear head (last layer) in full precision, as the evaluation protocol's
classifier is. The backbone keeps torchvision's ``state_dict`` names; quantizer parameters live
in ``self.quantizers``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core import checkpoint as ckpt
from ssql_core.bits import BitWidth, parse_bits
from ssql_core.errors import ConfigError
from ssql_core.models import build_backbone
from ssql_core.qnn import ActQuant, QConv2d, QLinear, QuantContext, bind_context
from ssql_core.quantizers.attach import attach

STUDENT = "student.pt"
STUDENT_KIND = "distilled_student"


class Student(nn.Module):
    """Quantized backbone + FP linear head; ``forward`` returns logits at ``bits``."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, family: str, bits: BitWidth | str,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.bits = parse_bits(bits)
        self.family = family
        self.backbone = backbone
        self.head = head
        self.quantizers = attach(backbone, family, self.bits, options)
        self.ctx: QuantContext = bind_context(backbone, QuantContext())

    def features(self, x: Tensor) -> Tensor:
        with self.ctx.quantized(self.bits):
            return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.backbone.parameters(), *self.head.parameters()] if p.requires_grad]

    def quantizer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.quantizers.parameters() if p.requires_grad]

    @torch.no_grad()
    def deploy_grids(self) -> dict[str, dict[str, Any]]:
        """Integer grids of every quantized weight and activation point (see Quantizer.export)."""
        weights, acts = {}, {}
        for name, m in self.backbone.named_modules():
            b = getattr(m, "_qat", None)
            if b is None:
                continue
            if isinstance(m, ActQuant):
                acts[name] = b.quantizer.export()
            elif isinstance(m, (QConv2d, QLinear)):
                weights[name] = b.quantizer.export(m.weight)
        return {"weights": weights, "activations": acts}


def student_from_teacher(teacher_backbone: nn.Module, head: nn.Linear, family: str, bits: BitWidth | str,
                         options: dict[str, Any] | None = None) -> Student:
    """A student initialised from (deep copies of) the teacher's backbone and head."""
    backbone = copy.deepcopy(teacher_backbone)
    for p in backbone.parameters():
        p.requires_grad_(True)
    h = copy.deepcopy(head)
    for p in h.parameters():
        p.requires_grad_(True)
    return Student(backbone, h, family, bits, options)


def save_student(student: Student, path: str | Path, extra: dict[str, Any]) -> None:
    """Write ``student.pt`` (weights_only-loadable): latent weights, quantizer state, int grids."""
    state = {
        "kind": STUDENT_KIND,
        "format_version": ckpt.FORMAT_VERSION,
        "bits": str(student.bits),
        "quantizer": student.family,
        "arch": dict(student.backbone.arch),
        "backbone": {k: v.detach().cpu() for k, v in student.backbone.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in student.head.state_dict().items()},
        "quantizers": {k: v.detach().cpu() for k, v in student.quantizers.state_dict().items()},
        "deploy": _to_cpu(student.deploy_grids()),
        **extra,
    }
    ckpt.save_atomic(state, path)


def load_student(path: str | Path, map_location: str = "cpu") -> tuple[dict[str, Any], Student]:
    """Rebuild a saved student (eval mode) and return it with its saved record."""
    state = ckpt.load(path, map_location)
    if state.get("kind") != STUDENT_KIND:
        raise ConfigError("checkpoint", f"{path} is not a distilled student ({STUDENT})")
    arch = state["arch"]
    backbone = build_backbone(arch["name"], arch["stem"], arch["width"])
    w = state["head"]["weight"]
    head = nn.Linear(w.shape[1], w.shape[0])
    student = Student(backbone, head, state["quantizer"], state["bits"], {"delta": state["config"]["ewgs_delta"]})
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    student.quantizers.load_state_dict(state["quantizers"])
    return state, student.eval()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj
