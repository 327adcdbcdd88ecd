"""Put trainable quantizers into a backbone's quant points without changing its state_dict.

:func:`attach` turns every ``QConv2d``/``QLinear``/``ActQuant`` of a model into a subclass that,
when the model's :class:`QuantContext` is in QUANT mode *at the attached bit-width*, quantizes
with its own quantizer (PACT, LSQ, ...) instead of PSQ. At any other bit-width, in FP and in
RECORD mode they behave exactly as before, so ``ssql_core.evaluate`` (PSQ PTQ) still works on the
model. The quantizers (and their learnable parameters) are returned in an ``nn.ModuleDict`` for the
caller to own: the backbone's ``state_dict`` keeps torchvision's names.
Stem points (role ``fixed8``) get 8-bit quantizers of the same family.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ssql_core.bits import BitWidth, parse_bits
from ssql_core.qnn import FIXED8, ActQuant, Mode, QConv2d, QLinear, QuantContext
from ssql_core.quantizers import build_quantizer
from ssql_core.quantizers.base import Quantizer, TensorStats


class _Binding:
    """A quant point's trainable quantizer and the bit-width at which it takes over from PSQ."""

    def __init__(self, quantizer: Quantizer, target: BitWidth) -> None:
        self.quantizer, self.target = quantizer, target

    def active(self, ctx: QuantContext) -> bool:
        return (
            ctx.mode is Mode.QUANT and ctx.quant_w and ctx.quant_a
            and int(ctx.w_bits.item()) == self.target.w and int(ctx.a_bits.item()) == self.target.a
        )


class QATConv2d(QConv2d):
    _qat: _Binding | None = None

    def quant_weight(self) -> Tensor:
        b = self._qat
        if b is not None and b.active(self._qctx):
            return b.quantizer(self.weight)
        return super().quant_weight()


class QATLinear(QLinear):
    _qat: _Binding | None = None

    def forward(self, x: Tensor) -> Tensor:
        b = self._qat
        if b is not None and b.active(self._qctx):
            return F.linear(x, b.quantizer(self.weight), self.bias)
        return super().forward(x)


class QATAct(ActQuant):
    _qat: _Binding | None = None

    def forward(self, x: Tensor) -> Tensor:
        b = self._qat
        if b is not None and b.active(self._qctx):
            return b.quantizer(x)
        return super().forward(x)


def key(name: str, kind: str) -> str:
    """ModuleDict key of a quant point (module names never contain '-')."""
    return f"{name.replace('.', '-')}-{kind}"


def signed_points(model: nn.Module) -> set[str]:
    """Activation points that see negative values: MobileNetV2 block outputs (no ReLU before)."""
    from ssql_core.models import _QInvertedResidual

    return {f"{n}.act_out" if n else "act_out" for n, m in model.named_modules() if isinstance(m, _QInvertedResidual)}


def attach(model: nn.Module, family: str, bits: BitWidth | str, options: dict | None = None) -> nn.ModuleDict:
    """Give every quant point of ``model`` a ``family`` quantizer at ``bits``; see module docstring."""
    target = parse_bits(bits)
    if target.is_fp or target.w is None or target.a is None:
        raise ValueError(f"quantization-aware training needs a bit-width like '4w4a', got {bits!r}")
    signed = signed_points(model)
    qdict = nn.ModuleDict()
    for name, m in list(model.named_modules()):
        if isinstance(m, (QConv2d, QLinear)):
            b = 8 if m.role == FIXED8 else target.w
            q = build_quantizer(family, "weight", b, True, options)
            m.__class__ = QATConv2d if isinstance(m, QConv2d) else QATLinear
            kind = "w"
        elif isinstance(m, ActQuant):
            b = 8 if m.role == FIXED8 else target.a
            q = build_quantizer(family, "act", b, name in signed, options)
            m.__class__ = QATAct
            kind = "a"
        else:
            continue
        object.__setattr__(m, "_qat", _Binding(q, target))
        qdict[key(name, kind)] = q
    return qdict


@torch.no_grad()
def init_quantizers(model: nn.Module, images: Iterable[Tensor], eval_mode: bool = True) -> int:
    """Data-dependent init of every attached quantizer: weights from themselves, activations from
    FP forwards over ``images`` (in eval mode for a trained model; ``eval_mode=False`` for one
    trained from scratch, whose BN running statistics mean nothing yet). Returns the image count."""
    stats: dict[str, TensorStats] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, QATAct) and m._qat is not None:
            stats[name] = TensorStats()

            def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
                stats[name].update(inp[0])

            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.train(not eval_mode)
    n = 0
    try:
        for x in images:
            model(x)
            n += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, m in model.named_modules():
        b = getattr(m, "_qat", None)
        if b is None:
            continue
        if isinstance(m, QATAct):
            if stats[name].count:
                b.quantizer.init_from(stats[name])
        else:
            b.quantizer.init_from(TensorStats.of(m.weight))
    return n


def quantizer_parameters(qdict: nn.ModuleDict) -> list[nn.Parameter]:
    return [p for p in qdict.parameters() if p.requires_grad]
