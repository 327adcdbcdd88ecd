"""The PSQ quantizer of SPEC section 2: min-max ranges recomputed every step, nothing learned.

* weights: symmetric, per output channel (axis 0), scale ``max|w_c| / ((2^b - 1) / 2)``;
* activations: asymmetric, per tensor, for a given range ``[lo, hi]``;
* gradients: straight-through, 1 where the rounded integer lies in the integer range
  (boundaries included), 0 outside; scales and zero points are detached.

``bits`` may be a Python int or a 0-dim tensor: a tensor lets a compiled model switch bit-width
without recompiling (the graph reads the value, it does not specialise on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: guards the scale of a dead channel / an empty activation range
EPS = 1e-8


def _as_float(bits: int | Tensor, like: Tensor) -> Tensor | float:
    return bits.to(device=like.device, dtype=torch.float32) if isinstance(bits, Tensor) else float(bits)


class _RoundClampSTE(torch.autograd.Function):
    """``clamp(round(x / s) + z, qmin, qmax)`` dequantized, with the boundary-inclusive STE mask."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, qmin: Tensor | float, qmax: Tensor | float,  # type: ignore[override]
                divide: bool = False) -> Tensor:
        # x * (1/s), as torch.fake_quantize_* computes it: the extreme weight of each channel sits
        # exactly on a .5 tie, so the two spellings of "x / s" can round it differently
        # (``divide=True`` is the reference implementation's x / s).
        # In-place after the first op: on CPU every fresh activation-sized buffer costs page faults.
        q = x / scale if divide else x * (1.0 / scale)
        q.round_().add_(zero)
        inside = q >= qmin
        inside &= q <= qmax
        ctx.save_for_backward(inside)
        return q.clamp_(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        # bool -> float first: multiplying by a bool (or torch.where / masked_fill) takes a slow
        # path on channels_last tensors, about 7x slower on CPU
        return grad * inside.to(grad.dtype), None, None, None, None, None


def _attached_scale_quant(x: Tensor, scale: Tensor, qmin: Tensor | float, qmax: Tensor | float, divide: bool) -> Tensor:
    """The reference's weight quantizer: ``clamp(round_ste(x / s)) * s`` with ``s`` not detached,
    so autograd also carries each channel's gradient through its scale to its largest weight
    (d/ds = round(x/s) - x/s inside the range, the clamp bound outside). The straight-through mask
    is boundary-inclusive, as ``torch.clamp`` with scalar bounds (the paper's) passes the gradient
    at its bounds; tensor bounds would halve it there."""
    v = x / scale if divide else x * (1.0 / scale)
    r = torch.round(v).detach()
    inside = ((r >= qmin) & (r <= qmax)).to(x.dtype)
    return (torch.clamp(r, qmin, qmax) + inside * (v - v.detach())) * scale


def weight_scale(w: Tensor, bits: int | Tensor, detach: bool = True) -> Tensor:
    """Per-output-channel symmetric scale, shaped to broadcast against ``w`` (detached unless asked)."""
    w = w.detach().float() if detach else w.float()
    dims = tuple(range(1, w.dim()))  # reducing in place: reshape would copy a channels_last weight
    maxabs = torch.maximum(torch.amin(w, dim=dims).abs(), torch.amax(w, dim=dims))
    b = _as_float(bits, w)
    scale = maxabs / ((2.0**b - 1.0) / 2.0)
    scale = torch.clamp(scale, min=EPS)
    return scale.reshape((-1,) + (1,) * (w.dim() - 1))


def weight_int_range(bits: int | Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    b = _as_float(bits, like)
    half = torch.as_tensor(2.0**(b - 1.0), device=like.device, dtype=torch.float32)
    return -half, half - 1.0


def _eager(bits: int | Tensor) -> bool:
    """Python-int bits outside a compiled graph: scalar fast paths apply.

    Weights use torch's fused per-channel fake-quant kernel, which computes exactly our formula
    (x * (1/s), round-half-even, boundary-inclusive STE mask; the tests check equality).
    Activations keep our own function (torch's fused per-tensor CPU kernel measured slower than
    these few in-place ops) with Python-scalar bounds.
    """
    return isinstance(bits, int) and not torch.compiler.is_compiling()


def quantize_weight(w: Tensor, bits: int | Tensor, scale_grad: str = "detached", rounding: str = "reciprocal") -> Tensor:
    """Fake-quantize ``w`` per output channel at ``bits`` (SPEC 2), straight-through gradient.

    ``scale_grad="attached"`` and ``rounding="divide"`` are the reference implementation's
    behaviours (config fields ``weight_scale_grad`` and ``rounding``)."""
    divide = rounding == "divide"
    if scale_grad == "attached":
        qmin, qmax = weight_int_range(bits, w)
        return _attached_scale_quant(w.float(), weight_scale(w, bits, detach=False), qmin, qmax, divide).to(w.dtype)
    scale = weight_scale(w, bits)
    if divide:
        qmin, qmax = weight_int_range(bits, w)
        zero = torch.zeros((), device=w.device, dtype=torch.float32)
        return _RoundClampSTE.apply(w.float(), scale, zero, qmin, qmax, True).to(w.dtype)
    if _eager(bits):
        zeros = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        out = torch.fake_quantize_per_channel_affine(w.float(), scale.reshape(-1), zeros, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return out.to(w.dtype)
    qmin, qmax = weight_int_range(bits, w)
    zero = torch.zeros((), device=w.device, dtype=torch.float32)
    out = _RoundClampSTE.apply(w.float(), scale, zero, qmin, qmax)
    return out.to(w.dtype)


def weight_to_int(w: Tensor, bits: int, rounding: str = "reciprocal") -> tuple[Tensor, Tensor]:
    """Integer weights and per-channel scales (flat, float32) such that ``w_hat = w_int * scale``."""
    scale = weight_scale(w, bits)
    qmin, qmax = weight_int_range(bits, w)
    v = w.detach().float() / scale if rounding == "divide" else w.detach().float() * (1.0 / scale)
    w_int = torch.clamp(torch.round(v), qmin, qmax)
    return w_int.to(torch.int8), scale.reshape(-1)


def activation_qparams(bits: int | Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scale, zero point and ``qmax`` of the asymmetric per-tensor quantizer for ``[lo, hi]``."""
    lo = torch.as_tensor(lo, dtype=torch.float32).detach()
    hi = torch.as_tensor(hi, dtype=torch.float32).detach()
    b = _as_float(bits, lo)
    qmax = torch.as_tensor(2.0**b - 1.0, device=lo.device, dtype=torch.float32)
    scale = torch.clamp((hi - lo) / qmax, min=EPS)
    zero = -torch.round(lo / scale)
    return scale, zero, qmax


def quantize_activation(x: Tensor, bits: int | Tensor, lo: Tensor | float, hi: Tensor | float, rounding: str = "reciprocal") -> Tensor:
    """Fake-quantize ``x`` per tensor for the range ``[lo, hi]`` at ``bits`` (SPEC 2), STE."""
    divide = rounding == "divide"
    lo_t = torch.as_tensor(lo, dtype=torch.float32, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=torch.float32, device=x.device)
    scale, zero, qmax = activation_qparams(bits, lo_t, hi_t)
    if _eager(bits):  # Python bounds: clamp/compare with scalars are ~3x faster than with tensors
        out = _RoundClampSTE.apply(x.float(), scale, zero, 0.0, float(2**bits - 1), divide)
    else:
        out = _RoundClampSTE.apply(x.float(), scale, zero, torch.zeros_like(qmax), qmax, divide)
    return out.to(x.dtype)
