"""Quantization points that share one copy of weights between an FP and a quantized view.

A :class:`QuantContext` is a small mutable switch shared by every quant point of one model:

* ``FP``: plain full-precision forward;
* ``RECORD``: full-precision forward that widens each activation point's ``[lo, hi]`` range
  (the union over every batch seen since :meth:`QuantContext.reset_ranges`);
* ``QUANT``: weights fake-quantized from the current weights, activations fake-quantized with
  the recorded ranges, at the context's bit-widths.

Bit-widths live in 0-dim tensors changed in place, so a ``torch.compile``-d model switches
bit-width without recompiling; only the three modes are distinct graphs. Quant points carry no
persistent state, so a model's ``state_dict`` keeps torchvision's parameter names.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ssql_core.bits import BitWidth, parse_bits
from ssql_core.quant import quantize_activation, quantize_weight


class Mode(enum.Enum):
    FP = "fp"
    RECORD = "record"
    QUANT = "quant"


#: role of a quant point: ``"step"`` follows the context's bit-width, ``"fixed8"`` stays at 8
STEP, FIXED8 = "step", "fixed8"


class QuantContext:
    """The switch every quant point of one model reads (see module docstring)."""

    def __init__(self, rounding: str | None = "reciprocal", weight_scale_grad: str | None = "detached") -> None:
        self.mode = Mode.FP
        #: the quantizer's behaviours (PretrainConfig fields of the same names; None = ours)
        self.rounding = rounding or "reciprocal"
        self.weight_scale_grad = weight_scale_grad or "detached"
        self.quant_w = True
        self.quant_a = True
        self.w_bits = torch.tensor(8.0)
        self.a_bits = torch.tensor(8.0)
        # the same bits as Python ints, for torch's fused eager kernels (see quant._eager)
        self.w_int, self.a_int = 8, 8
        #: set by ``quantized(..., reuse_weights=True)``: quantized weights are computed once per
        #: such block and shared by the passes inside it (both views), in eager mode; 0 = off
        self.generation = 0
        self._generations = 0
        self.points: list[ActQuant] = []
        #: per quant point bits of a per-layer configuration (``ssql_core.bitconfig.MixedBits``);
        #: None: every point at the context's bits (the stem at 8)
        self.point_bits: dict[nn.Module, int] | None = None

    def set_bits(self, bits: Any) -> None:
        """A bit-width (``"4w4a"``, :class:`BitWidth`) for every point, or a per-layer
        configuration resolved against this model (:class:`ssql_core.bitconfig.MixedBits`)."""
        if not isinstance(bits, (str, BitWidth)):  # MixedBits: each point's own bits, eager mode only
            self.quant_w = self.quant_a = True
            self.w_int = self.a_int = 8
            self.w_bits.fill_(8)
            self.a_bits.fill_(8)
            self.point_bits = bits.by_module
            return
        b = parse_bits(bits)
        self.point_bits = None
        self.quant_w = b.w is not None
        self.quant_a = b.a is not None
        self.w_int, self.a_int = b.w or 8, b.a or 8
        self.w_bits.fill_(self.w_int)
        self.a_bits.fill_(self.a_int)

    def to(self, device: torch.device | str) -> QuantContext:
        """Keep the bit-width tensors on ``device`` (a compiled CUDA graph then reads them there)."""
        self.w_bits, self.a_bits = self.w_bits.to(device), self.a_bits.to(device)
        return self

    def weight_bits(self, role: str) -> int | torch.Tensor:
        if role == FIXED8:
            return 8
        return self.w_bits if torch.compiler.is_compiling() else self.w_int

    def act_bits(self, role: str) -> int | torch.Tensor:
        if role == FIXED8:
            return 8
        return self.a_bits if torch.compiler.is_compiling() else self.a_int

    def bits_of(self, point: nn.Module) -> int | torch.Tensor:
        """The bits quant point ``point`` runs at now: its own under a per-layer configuration,
        else its role's (:meth:`weight_bits` / :meth:`act_bits`)."""
        if self.point_bits is not None:
            b = self.point_bits.get(point)
            if b is not None:
                return b
        role = point.role  # type: ignore[union-attr]
        return self.act_bits(role) if isinstance(point, ActQuant) else self.weight_bits(role)

    def reset_ranges(self) -> None:
        for p in self.points:
            p.reset_range()

    @contextlib.contextmanager
    def mode_as(self, mode: Mode) -> Iterator[None]:
        prev = self.mode
        self.mode = mode
        try:
            yield
        finally:
            self.mode = prev

    def recording(self, reset: bool = True) -> contextlib.AbstractContextManager[None]:
        """FP forward that records activation ranges (reset first unless ``reset=False``)."""
        if reset:
            self.reset_ranges()
        return self.mode_as(Mode.RECORD)

    @contextlib.contextmanager
    def quantized(self, bits: Any, reuse_weights: bool = False) -> Iterator[None]:
        """Quantized forward at ``bits`` (a bit-width, or a per-layer configuration resolved
        against this model: :class:`ssql_core.bitconfig.MixedBits`) with the ranges recorded last.

        ``reuse_weights=True`` promises that the weights do not change and that backward runs at
        most once inside the block (one training step's forward passes): each layer's weight is
        then quantized once for all passes in the block.
        """
        b = parse_bits(bits) if isinstance(bits, (str, BitWidth)) else bits
        if b.is_fp:
            yield
            return
        self.set_bits(b)
        if reuse_weights:
            self._generations += 1
            self.generation = self._generations
        try:
            with self.mode_as(Mode.QUANT):
                yield
        finally:
            self.generation = 0


_FP_CONTEXT = QuantContext()  # what an unbound quant point reads: always FP


class _QuantPoint:
    role: str = STEP
    _qctx: QuantContext = _FP_CONTEXT

    def bind(self, ctx: QuantContext) -> None:
        # plain attribute, not a submodule: the context is not part of the model's state
        object.__setattr__(self, "_qctx", ctx)


def _cached_quant_weight(m: nn.Conv2d | nn.Linear, ctx: QuantContext) -> Tensor:
    """The layer's quantized weight, computed once per QUANT-mode entry (eager mode only).

    Within one ``ctx.quantized(...)`` block the weights cannot change (the optimizer steps
    outside it), so the second view's pass reuses the first's tensor; autograd sums both
    passes' gradients through the one quantize node.
    """
    bits = ctx.bits_of(m)
    if torch.compiler.is_compiling() or ctx.generation == 0:  # compiled: no guard on the generation
        return quantize_weight(m.weight, bits, ctx.weight_scale_grad, ctx.rounding)
    key = (id(ctx), ctx.generation, id(m.weight), m.weight._version)
    cache = m.__dict__.get("_wq_cache")
    if cache is not None and cache[0] == key:
        return cache[1]
    wq = quantize_weight(m.weight, bits, ctx.weight_scale_grad, ctx.rounding)
    m.__dict__["_wq_cache"] = (key, wq)
    return wq


def _quant_weight(m: nn.Conv2d | nn.Linear, ctx: QuantContext) -> Tensor:
    """The QUANT-mode weight: a rounding override's (``ssql_core.ptq``: learned integers on the
    PSQ grid, or AdaRound's soft rounding while it is learned) when one is set, else PSQ's."""
    override = m.__dict__.get("weight_override")
    if override is not None:
        return override(m, ctx.bits_of(m))
    return _cached_quant_weight(m, ctx)


class QConv2d(nn.Conv2d, _QuantPoint):
    """``nn.Conv2d`` whose weight is fake-quantized per channel in QUANT mode."""

    def quant_weight(self) -> Tensor:
        ctx = self._qctx
        if ctx.mode is Mode.QUANT and ctx.quant_w:
            return _quant_weight(self, ctx)
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quant_weight(), self.bias)


class QLinear(nn.Linear, _QuantPoint):
    """``nn.Linear`` whose weight is fake-quantized per output row in QUANT mode."""

    def forward(self, x: Tensor) -> Tensor:
        ctx = self._qctx
        w = self.weight
        if ctx.mode is Mode.QUANT and ctx.quant_w:
            w = _quant_weight(self, ctx)
        return F.linear(x, w, self.bias)


class ActQuant(nn.Module, _QuantPoint):
    """Activation quant point: records ``[lo, hi]`` in RECORD mode, quantizes in QUANT mode."""

    def __init__(self, role: str = STEP) -> None:
        super().__init__()
        self.role = role
        # not persistent: keeps state_dict keys identical to torchvision's; export saves them
        self.register_buffer("lo", torch.tensor(float("inf")), persistent=False)
        self.register_buffer("hi", torch.tensor(float("-inf")), persistent=False)

    def reset_range(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))

    def forward(self, x: Tensor) -> Tensor:
        ctx = self._qctx
        if ctx.mode is Mode.RECORD:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach())
                torch.minimum(self.lo, lo.float(), out=self.lo)
                torch.maximum(self.hi, hi.float(), out=self.hi)
            return x
        if ctx.mode is Mode.QUANT and ctx.quant_a:
            override = self.__dict__.get("act_override")  # a step size being learned (ssql_core.ptq.brecq)
            if override is not None:
                return override(x, ctx.bits_of(self))
            return quantize_activation(x, ctx.bits_of(self), self.lo, self.hi, ctx.rounding)
        return x

    def extra_repr(self) -> str:
        return f"role={self.role}"


def bind_context(model: nn.Module, ctx: QuantContext | None = None) -> QuantContext:
    """Attach every quant point of ``model`` to one context (a new one unless given)."""
    ctx = ctx or QuantContext()
    for m in model.modules():
        if isinstance(m, _QuantPoint):
            m.bind(ctx)
            if isinstance(m, ActQuant) and m not in ctx.points:
                ctx.points.append(m)
    return ctx


def act_points(model: nn.Module) -> dict[str, ActQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


def weight_points(model: nn.Module) -> dict[str, QConv2d | QLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}
