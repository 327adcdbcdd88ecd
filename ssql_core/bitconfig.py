"""Per-layer bit configurations (mixed precision) as a first-class value (docs/decisions/020).

A :class:`BitConfig` maps every quantized weight layer of a backbone, by its module name
(``"layer1.0.conv1"``, ``"layer2.0.downsample.0"``, ``"features.3.conv.1.0"``), to a
:class:`~ssql_core.bits.BitWidth` ``(w, a)``; it is accepted wherever a bit-width string is
(evaluation, export) and written as ``{"layer": "4w8a", ...}`` or ``{"layer": {"w": 4, "a": 8}}``.
Its name in result rows, heads and file names is :attr:`BitConfig.label` (``mixed-`` and 8 hex
digits of a sha256 of the canonical map): short enough for the service's ``bits`` columns.

* ``w`` is the layer's weight bits. The stem (role ``fixed8``, SPEC 3) stays at 8 bits: a map may
  leave it out or name it as ``8w8a``, nothing else.
* ``a`` is the bits of the activation point the layer's output reaches first (found on the
  ``torch.fx`` graph): ``act1`` for a block's ``conv1``, the block output point for the conv
  before the residual add *and* for the downsample conv, whose outputs meet in the add. Layers
  meeting at one point must give it the same ``a``.

:func:`resolve` checks a map against a backbone (an unknown layer, a missing one, a
disagreement: ``ValueError`` naming it) and returns :class:`MixedBits`, every quant point's bits,
which :class:`~ssql_core.qnn.QuantContext` runs. :func:`layer_table` and :func:`footprint` give
what the allocation needs and the rows report: parameters, MACs, input activation bits, the
model's size in bytes and its average weight bits.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ssql_core.bits import MAX_BITS, MIN_BITS, BitWidth, parse_bits
from ssql_core.qnn import FIXED8, ActQuant, QConv2d, QLinear, act_points, weight_points

LABEL_PREFIX = "mixed-"
LABEL_PATTERN = re.compile(r"^mixed-[0-9a-f]{8}$")
#: what a layer (module) name may be: PyTorch's dotted attribute names
LAYER_NAME = re.compile(r"^[A-Za-z0-9_.]{1,200}$", re.ASCII)
#: the bits of the input image (not quantized) when counting bit operations
FP_BITS = 32


@dataclass(frozen=True)
class BitConfig:
    """A per-layer map ``layer name -> BitWidth`` (sorted by name; see the module docstring)."""

    layers: tuple[tuple[str, BitWidth], ...]

    @property
    def is_fp(self) -> bool:
        return False

    def as_dict(self) -> dict[str, str]:
        """The canonical JSON form: ``{"layer": "4w8a"}``, sorted by layer name."""
        return {name: str(b) for name, b in self.layers}

    def get(self, name: str) -> BitWidth | None:
        return dict(self.layers).get(name)

    @property
    def label(self) -> str:
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        return LABEL_PREFIX + digest[:8]

    def __str__(self) -> str:
        return self.label


def _layer_bits(name: str, value: Any) -> BitWidth:
    if isinstance(value, Mapping):
        keys = set(value)
        if keys != {"w", "a"}:
            raise ValueError(f"layer {name!r}: an object needs exactly the keys 'w' and 'a' (integers {MIN_BITS}..{MAX_BITS}), "
                             f"got {sorted(map(str, keys))}")
        w, a = value["w"], value["a"]
        for what, b in (("w", w), ("a", a)):
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise ValueError(f"layer {name!r}: {what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {b!r}")
        return BitWidth(int(w), int(a))
    try:
        b = parse_bits(value)
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from None
    if b.is_fp:
        raise ValueError(f"layer {name!r}: 'fp' is not a per-layer bit-width (the whole model is either quantized or not); "
                         "give e.g. '4w8a'")
    return b


def parse_bit_config(value: Mapping[str, Any] | BitConfig) -> BitConfig:
    """A map ``{layer: "NwMa" | {"w": N, "a": M}}`` -> :class:`BitConfig`; ``ValueError`` naming
    the layer otherwise. Which layers a backbone has is checked by :func:`resolve`."""
    if isinstance(value, BitConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"a per-layer bit configuration is an object of layer name -> bit-width, got {type(value).__name__}")
    if not value:
        raise ValueError("a per-layer bit configuration names at least one layer")
    layers = []
    for name, v in value.items():
        if not isinstance(name, str) or not LAYER_NAME.match(name):
            raise ValueError(f"layer names are module names (ASCII letters, digits, '_' and '.', at most 200, such as "
                             f"'layer1.0.conv1'), got {name!r}")
        layers.append((name, _layer_bits(name, v)))
    return BitConfig(tuple(sorted(layers)))


def parse_bits_spec(value: Any) -> BitWidth | BitConfig:
    """A bit-width string (``"4w4a"``, ``"fp"``) or a per-layer map: what ``bits`` accepts."""
    if isinstance(value, (BitWidth, BitConfig)):
        return value
    if isinstance(value, Mapping):
        return parse_bit_config(value)
    return parse_bits(value)


def is_label(value: Any) -> bool:
    """Whether ``value`` is the label of a per-layer configuration (``mixed-xxxxxxxx``)."""
    return isinstance(value, str) and bool(LABEL_PATTERN.match(value))


def uniform(backbone: nn.Module, bits: str | BitWidth) -> BitConfig:
    """The map that gives every layer of ``backbone`` the same ``bits`` (the stem left out)."""
    b = parse_bits(bits)
    if b.is_fp:
        raise ValueError("a per-layer configuration is quantized: give e.g. '4w4a'")
    return BitConfig(tuple(sorted((n, b) for n in configurable_layers(backbone))))


# ---------------------------------------------------------------------------------------------
# the backbone's layers and dataflow


def configurable_layers(backbone: nn.Module) -> list[str]:
    """The weight layers a configuration sets (every weight point but the 8-bit stem), in module order."""
    return [n for n, m in weight_points(backbone).items() if m.role != FIXED8]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QConv2d, QLinear, ActQuant)) or super().is_leaf_module(m, qualname)


@dataclass
class Dataflow:
    """Per weight layer: the activation points its output reaches first (``out``) and the point
    its input comes from (``inp``, None for the input image)."""

    out: dict[str, list[str]] = field(default_factory=dict)
    inp: dict[str, str | None] = field(default_factory=dict)


def dataflow(backbone: nn.Module) -> Dataflow:
    """Follow the ``torch.fx`` graph from each weight layer to the nearest activation points."""
    graph = _Tracer().trace(backbone)
    mods = dict(backbone.named_modules())
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            m = mods[str(node.target)]
            if isinstance(m, ActQuant):
                kinds[node] = "act"
            elif isinstance(m, (QConv2d, QLinear)):
                kinds[node] = "weight"
    flow = Dataflow()
    for node, kind in kinds.items():
        if kind != "weight":
            continue
        name = str(node.target)
        seen: set[fx.Node] = set()
        todo, hits = list(node.users), []
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            k = kinds.get(n)
            if k == "act":
                hits.append(str(n.target))
            elif k != "weight":
                todo.extend(n.users)
        flow.out[name] = sorted(set(hits))
        up = node.args[0] if node.args else None
        src = None
        while isinstance(up, fx.Node):
            if kinds.get(up) == "act":
                src = str(up.target)
                break
            if up.op not in ("call_module", "call_function") or kinds.get(up) == "weight":
                break
            up = up.args[0] if up.args else None
        flow.inp[name] = src
    return flow


@dataclass
class MixedBits:
    """A :class:`BitConfig` resolved against one backbone: every quant point's bits (by name, and
    by module for :class:`~ssql_core.qnn.QuantContext`). ``str()`` is the config's label."""

    config: BitConfig
    weights: dict[str, int]
    acts: dict[str, int]
    by_module: dict[nn.Module, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_fp(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.config.label


def resolve(config: BitConfig | Mapping[str, Any], backbone: nn.Module) -> MixedBits:
    """Every quant point's bits under ``config`` for ``backbone``; ``ValueError`` naming the
    layer for a map that names a layer the backbone lacks, misses one, or gives two layers whose
    outputs meet at one activation point different activation bits."""
    cfg = parse_bit_config(config)
    wpoints, apoints = weight_points(backbone), act_points(backbone)
    wanted = configurable_layers(backbone)
    given = dict(cfg.layers)
    unknown = sorted(set(given) - set(wpoints))
    if unknown:
        close = [n for n in wanted if n.rsplit(".", 1)[-1] == unknown[0].rsplit(".", 1)[-1]][:3]
        raise ValueError(f"layer {unknown[0]!r} is not a weight layer of this {_arch_name(backbone)}"
                         f"{' (' + str(len(unknown)) + ' unknown)' if len(unknown) > 1 else ''}; its layers are "
                         f"{_names(wanted)}{'; similar: ' + ', '.join(close) if close else ''}")
    missing = [n for n in wanted if n not in given]
    if missing:
        raise ValueError(f"the configuration misses {len(missing)} of the {len(wanted)} layers of this {_arch_name(backbone)}: "
                         f"{_names(missing)}; every layer needs a bit-width")
    for n, b in given.items():
        if wpoints[n].role == FIXED8 and b != BitWidth(8, 8):
            raise ValueError(f"layer {n!r} is the stem, fixed at 8-bit weights and activations (SPEC 3): leave it out or give '8w8a'")
    flow = dataflow(backbone)
    weights = {n: 8 if m.role == FIXED8 else int(given[n].w) for n, m in wpoints.items()}  # type: ignore[arg-type]
    acts: dict[str, int] = {}
    source: dict[str, str] = {}
    for n, m in wpoints.items():
        a = 8 if m.role == FIXED8 else int(given[n].a)  # type: ignore[arg-type]
        for p in flow.out.get(n, []):
            if p in acts and acts[p] != a:
                raise ValueError(f"layers {source[p]!r} and {n!r} both feed activation point {p!r} (their outputs meet there): "
                                 f"give them the same activation bits (got {acts[p]} and {a})")
            acts[p], source[p] = a, n
    for p, point in apoints.items():
        if point.role == FIXED8:
            acts[p] = 8
        elif p not in acts:
            raise ValueError(f"activation point {p!r} is reached by no weight layer: this backbone is not one we configure per layer")
    by_module: dict[nn.Module, int] = {wpoints[n]: b for n, b in weights.items()}
    by_module.update({apoints[n]: b for n, b in acts.items() if n in apoints})
    return MixedBits(cfg, weights, {n: acts[n] for n in apoints}, by_module)


def _arch_name(backbone: nn.Module) -> str:
    arch = getattr(backbone, "arch", None)
    return str(arch.get("name", "backbone")) if isinstance(arch, dict) else "backbone"


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def point_weight_bits(name: str, module: nn.Module, bits: BitWidth | MixedBits) -> int:
    """The bits weight point ``name`` runs at under ``bits`` (uniform: the stem at 8)."""
    if isinstance(bits, MixedBits):
        return bits.weights[name]
    return 8 if getattr(module, "role", None) == FIXED8 else int(bits.w or 8)


def point_act_bits(name: str, point: nn.Module, bits: BitWidth | MixedBits) -> int:
    """The bits activation point ``name`` runs at under ``bits`` (uniform: the stem's at 8)."""
    if isinstance(bits, MixedBits):
        return bits.acts[name]
    return 8 if getattr(point, "role", None) == FIXED8 else int(bits.a or 8)


def as_bits(value: Any, backbone: nn.Module | None = None) -> BitWidth | MixedBits:
    """A bit-width string, :class:`BitWidth`, map or :class:`BitConfig` (resolved against
    ``backbone``), or an already resolved :class:`MixedBits`."""
    if isinstance(value, MixedBits):
        return value
    spec = parse_bits_spec(value)
    if isinstance(spec, BitConfig):
        if backbone is None:
            raise ValueError("a per-layer bit configuration needs the backbone it configures")
        return resolve(spec, backbone)
    return spec


# ---------------------------------------------------------------------------------------------
# what a configuration costs


@dataclass(frozen=True)
class Layer:
    """One weight layer: parameters, multiply-accumulates per image, its input's bits (None:
    decided by the configuration; an int: fixed, the stem's 8 or the image's ``FP_BITS``)."""

    name: str
    params: int
    out_channels: int
    macs: int
    configurable: bool
    input_point: str | None


@dataclass
class LayerTable:
    """The weight layers of a backbone and the bytes that do not depend on the weight bits."""

    layers: list[Layer]
    #: FP tensors of the packed file (BN, unquantized biases), scales, activation ranges
    fixed_bytes: int
    #: every state tensor at full precision (the ``fp`` file's size)
    fp_bytes: int
    act_points: dict[str, str]  # name -> role

    @property
    def configurable(self) -> list[Layer]:
        return [la for la in self.layers if la.configurable]


@torch.no_grad()
def layer_table(backbone: nn.Module, image_size: int) -> LayerTable:
    """Parameters and MACs (at ``image_size``) of every weight layer of ``backbone``; the
    backbone is copied onto the meta device, so this costs no memory or compute."""
    from ssql_core.models import build_backbone

    arch = getattr(backbone, "arch", None)
    if isinstance(arch, dict) and {"name", "stem", "width"} <= set(arch):
        with torch.device("meta"):
            meta = build_backbone(arch["name"], arch["stem"], arch["width"])
    else:
        meta = backbone
    meta.eval()
    wpoints = weight_points(meta)
    macs: dict[str, int] = {}
    hooks = []
    for n, m in wpoints.items():
        def hook(mod: nn.Module, _inp: Any, out: torch.Tensor, n: str = n) -> None:
            per_out = mod.weight[0].numel()  # type: ignore[index]
            positions = math.prod(out.shape[2:]) if out.dim() > 2 else 1
            macs[n] = int(out.shape[1]) * positions * int(per_out)
        hooks.append(m.register_forward_hook(hook))
    try:
        dev = next(meta.parameters()).device
        meta(torch.zeros(1, 3, image_size, image_size, device=dev))
    finally:
        for h in hooks:
            h.remove()
    flow = dataflow(meta)
    layers = [Layer(n, int(m.weight.numel()), int(m.weight.shape[0]), macs.get(n, 0), m.role != FIXED8, flow.inp.get(n))
              for n, m in wpoints.items()]
    weight_keys = {f"{n}.weight" for n in wpoints}
    state = meta.state_dict()
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in weight_keys)
    scales = sum(4 * la.out_channels for la in layers)
    apts = act_points(meta)
    fixed = other + scales + 8 * len(apts)
    fp = sum(t.numel() * t.element_size() for t in state.values())
    return LayerTable(layers, fixed, fp, {n: p.role for n, p in apts.items()})


def footprint(table: LayerTable, bits: BitWidth | MixedBits) -> dict[str, Any]:
    """What a result row says about the model at ``bits``: ``model_bytes`` (the packed file's
    tensors: every weight at its bits, FP tensors, scales and ranges; the file adds its index
    and manifest), ``weight_bits_avg`` (over the configurable layers, weighted by parameters)
    and ``bops`` (bit operations per image: MACs x weight bits x input activation bits)."""
    if isinstance(bits, BitWidth) and bits.is_fp:
        return {"model_bytes": table.fp_bytes, "weight_bits_avg": 32.0,
                "bops": sum(la.macs for la in table.layers) * FP_BITS * FP_BITS}
    wbits, abits = _point_bits(table, bits)
    total_bits = sum(la.params * wbits[la.name] for la in table.layers)
    conf = table.configurable
    n = sum(la.params for la in conf)
    avg = sum(la.params * wbits[la.name] for la in conf) / n if n else 0.0
    bops = sum(la.macs * wbits[la.name] * (abits.get(la.input_point, FP_BITS) if la.input_point else FP_BITS)
               for la in table.layers)
    return {"model_bytes": table.fixed_bytes + (total_bits + 7) // 8, "weight_bits_avg": round(avg, 4), "bops": int(bops)}


def _point_bits(table: LayerTable, bits: BitWidth | MixedBits) -> tuple[dict[str, int], dict[str, int]]:
    if isinstance(bits, MixedBits):
        return bits.weights, bits.acts
    w = {la.name: int(bits.w or 8) if la.configurable else 8 for la in table.layers}
    a = {p: 8 if role == FIXED8 else int(bits.a or 8) for p, role in table.act_points.items()}
    return w, a
