"""A calibrated backbone at one bit-width as plain tensors, and the module rebuilt from them.

:func:`quantize_backbone` reads, from a backbone whose activation ranges were calibrated, exactly
what the fake-quant forward at ``{w}w{a}a`` uses: per-channel integer weights and scales (computed
by the same code path as :class:`~ssql_core.qnn.QConv2d` in QUANT mode, and checked bit for bit
against it), the activation ranges, and every FP tensor (BN, unquantized parameters). A layer with
learned rounding (:mod:`ssql_core.ptq`) contributes its learned integers on the same PSQ grid.

:func:`build_quantized_model` inverts it: the same backbone class with ``w_int * scale`` as its
weights (no re-quantization: min-max on already-quantized weights is not idempotent) and its
activation points quantizing at ``a`` bits with the stored ranges. Both run the same float32
operations, so the rebuilt module's outputs equal the fake-quant model's.

Both follow the quantizer's ``rounding`` (``QuantContext.rounding``: ``"reciprocal"``, ours,
``round(x * (1/s))``, or ``"divide"``, the reference preset's ``round(x / s)``): the two spellings
round values on a .5 boundary differently, and every channel's largest weight sits on one by
construction (``max|w| / s = (2^b - 1) / 2``), so integers taken with the other rule would not be
the weights the run was evaluated with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core.bitconfig import BitConfig, MixedBits, as_bits, point_act_bits, point_weight_bits
from ssql_core.bits import BitWidth
from ssql_core.models import build_backbone
from ssql_core.qnn import (
    ActQuant,
    Mode,
    QConv2d,
    QLinear,
    QuantContext,
    act_points,
    bind_context,
    weight_points,
)
from ssql_core.quant import quantize_weight, weight_int_range, weight_scale

#: the quantizer's two roundings (PretrainConfig / EvalConfig ``rounding``)
ROUNDINGS = ("reciprocal", "divide")


@dataclass
class QuantizedWeight:
    """One weight quant point: integers in ``[-2^(b-1), 2^(b-1)-1]`` and per-output-channel scales."""

    ints: Tensor  # int8, the weight's shape
    scale: Tensor  # float32 [out_channels]
    bits: int
    role: str

    def dequantize(self) -> Tensor:
        """``w_int * scale``: the float32 weight the fake-quant forward uses."""
        return self.ints.float() * self.scale.reshape((-1,) + (1,) * (self.ints.dim() - 1))


@dataclass
class QuantizedBackbone:
    """Everything needed to run a backbone at one bit-width (see module docstring)."""

    arch: dict[str, Any]
    #: a uniform bit-width, or a per-layer configuration (each entry below has its own bits)
    bits: BitWidth | BitConfig
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    #: activation point name -> (range [lo, hi] float32, bits, role)
    ranges: dict[str, tuple[Tensor, int, str]] = field(default_factory=dict)
    #: every other state_dict entry (BN, FP weights when bits is fp), torchvision names
    fp: dict[str, Tensor] = field(default_factory=dict)
    #: the quantizer's rounding the integers were taken with and activations quantize with
    rounding: str = "reciprocal"


def arch_of(backbone: nn.Module) -> dict[str, Any]:
    """``{"name", "stem", "width"}`` of a backbone built by :func:`ssql_core.models.build_backbone`."""
    arch = getattr(backbone, "arch", None)
    if not isinstance(arch, dict) or not {"name", "stem", "width"} <= set(arch):
        raise ValueError("backbone has no .arch {name, stem, width}: build it with ssql_core.models.build_backbone")
    return {"name": str(arch["name"]), "stem": str(arch["stem"]), "width": float(arch["width"])}


def check_standard_backbone(backbone: nn.Module) -> dict[str, Any]:
    """Refuse backbones whose state the PSQ layout cannot describe (e.g. learned clip values)."""
    arch = arch_of(backbone)
    odd = sorted({type(m).__name__ for m in backbone.modules()
                  if isinstance(m, (QConv2d, QLinear, ActQuant)) and type(m) not in (QConv2d, QLinear, ActQuant)})
    if odd:
        raise ValueError(f"backbone quant points carry their own quantizers ({', '.join(odd)}): "
                         "the PSQ export would not reproduce what they compute")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ref = build_backbone(arch["name"], arch["stem"], arch["width"])
    ours, theirs = backbone.state_dict(), ref.state_dict()
    extra, missing = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if extra or missing:
        raise ValueError(
            f"backbone state differs from a standard {arch['name']} (extra {extra[:5]}, missing {missing[:5]}): "
            "only backbones quantized with the PSQ quantizer (ssql_core.qnn) can be exported"
        )
    for k, v in ours.items():
        if v.shape != theirs[k].shape:
            raise ValueError(f"backbone tensor {k} has shape {tuple(v.shape)}, a standard {arch['name']} has {tuple(theirs[k].shape)}")
    return arch


def bound_rounding(backbone: nn.Module) -> str:
    """The rounding of the context ``backbone``'s quant points are bound to (``"reciprocal"`` if none)."""
    for m in backbone.modules():
        if isinstance(m, (QConv2d, QLinear, ActQuant)):
            return m._qctx.rounding
    return "reciprocal"


@torch.no_grad()
def quantize_backbone(backbone: nn.Module, bits: Any, rounding: str | None = None) -> QuantizedBackbone:
    """Integer weights, scales, ranges and FP tensors of a calibrated ``backbone`` at ``bits``
    (a bit-width, or a per-layer configuration: :mod:`ssql_core.bitconfig`), with ``rounding``
    (default: the rounding of the context the backbone is bound to, i.e. what its fake-quant
    forward computes)."""
    rounding = rounding or bound_rounding(backbone)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    b = as_bits(bits, backbone)
    arch = check_standard_backbone(backbone)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    out = QuantizedBackbone(arch=arch, bits=b.config if isinstance(b, MixedBits) else b, rounding=rounding)
    if b.is_fp:
        out.fp = state
        return out
    ctx = QuantContext()
    ctx.set_bits(b)
    for name, mod in weight_points(backbone).items():
        w = mod.weight.detach().float().cpu()
        arg = ctx.bits_of(mod)  # what QConv2d.quant_weight passes in QUANT mode
        scale = weight_scale(w, arg)
        qmin, qmax = weight_int_range(arg, w)
        learned = getattr(mod.__dict__.get("weight_override"), "ints", None)  # ssql_core.ptq's rounding
        if learned is not None:
            ints = learned.detach().cpu().float()
            if ints.shape != w.shape or bool((ints < qmin).any() or (ints > qmax).any()):
                raise RuntimeError(f"{name}: learned integers do not fit the {arg}-bit grid of the weight")
            expect = mod.__dict__["weight_override"](mod, arg).detach().float().cpu()
        else:
            ints = torch.clamp(torch.round(w / scale if rounding == "divide" else w * (1.0 / scale)), qmin, qmax)
            expect = quantize_weight(w, arg, rounding=rounding)
        qw = QuantizedWeight(ints.to(torch.int8), scale.reshape(-1).clone(), point_weight_bits(name, mod, b), mod.role)
        if not torch.equal(qw.dequantize(), expect):
            raise RuntimeError(f"{name}: integer weights do not reproduce the fake-quant weights")
        out.weights[f"{name}.weight"] = qw
        if mod.bias is not None:
            out.fp[f"{name}.bias"] = state[f"{name}.bias"]
    for name, point in act_points(backbone).items():
        lo, hi = float(point.lo), float(point.hi)
        if not (torch.isfinite(point.lo) and torch.isfinite(point.hi)) or lo > hi:
            raise ValueError(f"activation point {name} has no calibrated range ({lo}, {hi}): calibrate the backbone first")
        out.ranges[name] = (torch.stack([point.lo, point.hi]).detach().float().cpu(), point_act_bits(name, point, b), point.role)
    out.fp.update({k: v for k, v in state.items() if k not in out.weights and k not in out.fp})
    return out


class QuantizedModel(nn.Module):
    """A backbone fixed at one bit-width (weights already quantized), optionally with its FP head.

    ``forward`` returns the pooled feature, or the class logits when a head is present, exactly as
    the fake-quant backbone at ``bits`` (plus the evaluation's FP linear classifier) computes them.
    """

    def __init__(self, backbone: nn.Module, bits: BitWidth | MixedBits, head: nn.Linear | None = None,
                 manifest: dict[str, Any] | None = None, rounding: str = "reciprocal") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        #: a uniform bit-width, or the per-layer configuration resolved against ``backbone``
        self.bits = bits
        self.manifest = manifest or {}
        self.ctx = bind_context(backbone, QuantContext(rounding=rounding))
        if not bits.is_fp:
            self.ctx.set_bits(bits)
            # weights hold w_int * scale already: quantize activations only
            self.ctx.quant_w = False
            self.ctx.mode = Mode.QUANT

    def forward(self, x: Tensor) -> Tensor:
        f = self.backbone(x)
        return self.head(f) if self.head is not None else f


def check_layout(q: QuantizedBackbone, backbone: nn.Module) -> BitWidth | MixedBits:
    """Every quant point of the architecture is present at the bits SPEC 3 (or the file's per-layer
    configuration) gives it, and no other; returns the bits resolved against ``backbone``."""
    b = as_bits(q.bits, backbone)
    expect_w = {f"{n}.weight": point_weight_bits(n, m, b) for n, m in weight_points(backbone).items()}
    expect_a = {n: point_act_bits(n, m, b) for n, m in act_points(backbone).items()}
    got_w = {k: w.bits for k, w in q.weights.items()}
    got_a = {k: r[1] for k, r in q.ranges.items()}
    for what, got, expect in (("weights", got_w, expect_w), ("activation ranges", got_a, expect_a)):
        if got != expect:
            bad = sorted(k for k in set(got) | set(expect) if got.get(k) != expect.get(k))
            raise ValueError(f"{what} do not match the {q.arch['name']} layout at {q.bits}: {bad[:5]}")
    return b


def build_quantized_model(q: QuantizedBackbone, head: dict[str, Tensor] | None = None, manifest: dict[str, Any] | None = None) -> QuantizedModel:
    """The module of :class:`QuantizedBackbone` ``q`` (see module docstring); strict shapes."""
    backbone = build_backbone(q.arch["name"], q.arch["stem"], q.arch["width"])
    state = dict(q.fp)
    state.update({k: w.dequantize() for k, w in q.weights.items()})
    backbone.load_state_dict(state, strict=True)
    points = act_points(backbone)
    bits = q.bits if q.bits.is_fp else check_layout(q, backbone)
    for name, (rng, _bits, _role) in q.ranges.items():
        points[name].lo.copy_(rng[0])
        points[name].hi.copy_(rng[1])
    lin = None
    if head is not None:
        w, bias = head["weight"], head["bias"]
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w, "bias": bias}, strict=True)
    model = QuantizedModel(backbone, bits, lin, manifest, q.rounding)  # type: ignore[arg-type]
    return model.eval()
