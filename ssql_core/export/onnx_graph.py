"""ONNX graph of a quantized backbone: QuantizeLinear/DequantizeLinear at the bit-width.

The graph is emitted node by node from a ``torch.fx`` trace of the rebuilt module (quant points
and convs kept as leaves), so it holds exactly the operations the fake-quant model runs. In the
``storage`` form (see ``FORMS`` for ``integer``, the default, and ``qlinear``, which run the convs
on the codes as ConvInteger / QLinearConv with BN folded):

* weights: integer initializers (INT4 for ``w <= 4``, opset 21; INT8 otherwise) with per-channel
  scales, ``DequantizeLinear(axis=0)`` into Conv; the values stay within ``b`` bits;
* activation points: ``QuantizeLinear -> DequantizeLinear`` per tensor with the calibrated range's
  scale and zero point in a UINT8 container; for ``a < 8`` a ``Clip`` to
  ``[(0 - z) s, (2^a - 1 - z) s]`` precedes QuantizeLinear so the codes stay in ``[0, 2^a - 1]``;
  a zero point outside UINT8 (a calibrated range not containing 0) uses INT16;
* BN unfolded (BatchNormalization), as in the checkpoint; the head as Gemm.

The arithmetic differs from PyTorch only by float rounding: the convolution's and BN's summation
order, and QuantizeLinear's ``x / s`` against the fake quantizer's ``x * (1 / s)``. Each moves a
value by about an ulp, which changes an activation code only when the value sits on a rounding
boundary; then that sample's output moves by about one quantization step. Computing ``x * (1/s)``
in the graph (Mul, then QuantizeLinear with scale 1) removes only the second source and breaks the
standard QDQ pattern runtimes fuse, so the graph keeps plain QDQ. :func:`compare_onnx` reports
the difference per sample; :func:`forced_code_agreement` compares every quant point's codes with
the PyTorch model's teacher-forced (each segment from the same input codes), which is the check
that holds exactly: codes differ only within float rounding of a .5 boundary. For a run with the
reference's ``rounding="divide"`` (``x / s``), QuantizeLinear's own division is that rounding and
the integers are taken with it too (the manifest's ``rounding``).
The manifest and a sha256 of the graph live in the model's ``metadata_props``.
"""

from __future__ import annotations

import hashlib
import json
import operator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, fx, nn

from ssql_core.bitconfig import BitConfig
from ssql_core.export.format import CheckpointError, write_atomic
from ssql_core.export.packing import pack_bits
from ssql_core.export.quantized import QuantizedBackbone, QuantizedModel, build_quantized_model
from ssql_core.qnn import ActQuant, QConv2d, QLinear
from ssql_core.quant import activation_qparams

OPSET = 21
#: The graph's forms (``build_onnx(form=...)``), all holding the same integers and ranges:
#: ``integer`` (default): every conv whose input is a UINT8 activation point runs ``ConvInteger``
#: on the codes (exact INT32 sums), then a float epilogue ``acc * (s_x s_w[c] g[c]) + b[c]`` with
#: the following BN folded in (``g, b``): the evaluated model up to float rounding. ``qlinear``:
#: as ``integer``, but a conv followed by ``BN -> [ReLU] -> quant point`` becomes the QDQ pattern
#: onnxruntime fuses into ``QLinearConv``, BN folded into the weight scales and an INT32 bias; that
#: bias is rounded (recorded per point as ``bias_rounding_steps``), so it is the evaluated model
#: only up to that; it is the fast one (QLinearConv; docs/RESULTS.md). ``storage``: plain QDQ on
#: the unfolded graph (onnxruntime runs every conv in float on dequantized weights). ``integer``
#: and ``storage`` store INT4 weights for ``w <= 4``; ``qlinear``'s fused convs need INT8.
FORMS = ("integer", "qlinear", "storage")
#: x86 u8 x s8 kernels without VNNI (AVX2 ``vpmaddubsw``) sum two products in a saturating int16:
#: QLinearConv's INT8 weights are kept to ``2 * max code * max |w| <= 32767``
_INT16 = 32767
FORMAT = "ssql-quantized-onnx"
FORMAT_VERSION = 1


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QConv2d, QLinear, ActQuant)) or super().is_leaf_module(m, qualname)


def _act_container(a: int, zero: int) -> tuple[int, bool]:
    """(ONNX element type, needs a Clip) for codes in ``[0, 2^a - 1]`` with zero point ``zero``.

    UINT8, not UINT4, even for ``a <= 4``: onnxruntime's default graph optimizer (ClipQuantFusion)
    fails on a UINT4 QuantizeLinear (ORT 1.31), and UINT8 runs everywhere. INT4 is used for weights.
    """
    if 0 <= zero <= 255:
        return TensorProto.UINT8, a < 8
    return TensorProto.INT16, True


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.acts: dict[str, Any] = {}

    def init(self, name: str, value: Tensor | np.ndarray, dtype: int | None = None) -> str:
        arr = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        if dtype is None:
            self.inits.append(numpy_helper.from_array(arr, name))
        else:
            self.inits.append(helper.make_tensor(name, dtype, list(arr.shape), arr.reshape(-1).tolist()))
        return name

    def init_weight_ints(self, name: str, ints: Tensor, dtype: int) -> str:
        """Integer weights as raw data: INT4 is ONNX's two-per-byte, low nibble first, which is
        our 4-bit bitstream; INT8 the bytes themselves."""
        t = TensorProto(name=name, data_type=dtype, dims=list(ints.shape))
        t.raw_data = (pack_bits(ints, 4) if dtype == TensorProto.INT4 else ints.to(torch.int8).reshape(-1)).numpy().tobytes()
        self.inits.append(t)
        return name

    def add(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _conv(g: _Graph, mod: nn.Conv2d, x: str, out: str, q: QuantizedBackbone, name: str, dequantized: bool = False) -> str:
    """A float Conv; quantized weights as INT4/INT8 + DequantizeLinear, or with ``dequantized`` as
    ``Cast(float) * scale``: the same float32 product the PyTorch model computes, which onnxruntime
    folds into a constant when a session loads and can then fold the following BN into (it folds
    no DequantizeLinear)."""
    key = f"{name}.weight"
    if key in q.weights:
        qw = q.weights[key]
        wtype = TensorProto.INT4 if qw.bits <= 4 else TensorProto.INT8
        ints = g.init_weight_ints(f"{key}_q", qw.ints, wtype)
        if dequantized:
            wf = g.add("Cast", [ints], f"{key}_float", to=TensorProto.FLOAT)
            w = g.add("Mul", [wf, g.init(f"{key}_scale", qw.scale.float().reshape((-1,) + (1,) * (qw.ints.dim() - 1)))], f"{key}_dq")
        else:
            zero = g.init(f"{key}_zero", np.zeros(qw.ints.shape[0], np.int8), wtype)
            w = g.add("DequantizeLinear", [ints, g.init(f"{key}_scale", qw.scale.float()), zero], f"{key}_dq", axis=0)
    else:
        w = g.init(key, mod.weight.float())
    inputs = [x, w] + ([g.init(f"{name}.bias", mod.bias.float())] if mod.bias is not None else [])
    return g.add("Conv", inputs, out, **_conv_attrs(mod))


def _conv_attrs(mod: nn.Conv2d) -> dict[str, Any]:
    pad = list(mod.padding)  # type: ignore[arg-type]
    return {"kernel_shape": list(mod.kernel_size), "strides": list(mod.stride), "pads": pad + pad,
            "dilations": list(mod.dilation), "group": mod.groups}


def _pool_attrs(mod: nn.MaxPool2d) -> dict[str, Any]:
    k, s, p = (mod.kernel_size, mod.stride, mod.padding)
    return {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4, "ceil_mode": int(mod.ceil_mode)}


def _act(g: _Graph, x: str, out: str, q: QuantizedBackbone, name: str, code_clip: bool = False, **extra: Any) -> str:
    """One activation point: ``[Clip] -> QuantizeLinear -> DequantizeLinear``. With ``code_clip``
    a UINT8 point clamps its *codes* after QuantizeLinear instead (``Clip`` on UINT8; exact:
    clamping the saturated 0..255 code to ``[0, 2^a - 1]`` is clamping the rounded value), so that
    QuantizeLinear reads the producing Conv directly, the pattern onnxruntime fuses."""
    if q.bits.is_fp:
        return g.add("Identity", [x], out)
    rng, a, _role = q.ranges[name]
    scale, zero, qmax = activation_qparams(a, rng[0], rng[1])  # a is 8 for the fixed8 stem point
    s, z, qm = float(scale), int(zero), int(qmax)
    dtype, clip = _act_container(a, z)
    code_clip = code_clip and clip and dtype == TensorProto.UINT8
    s_name = g.init(f"{name}_scale", np.array(s, np.float32))
    z_name = g.init(f"{name}_zero", np.array(z), dtype)
    source = x
    if clip and not code_clip:  # the bounds (c - z) * s in float32, as the fake quantizer's
        lo = g.init(f"{name}_clip_lo", ((0.0 - zero) * scale).reshape(()).float())
        hi = g.init(f"{name}_clip_hi", ((qmax - zero) * scale).reshape(()).float())
        x = g.add("Clip", [x, lo, hi], f"{name}_clip")
    qx = g.add("QuantizeLinear", [x, s_name, z_name], f"{name}_q")
    if code_clip:
        qx = g.add("Clip", [qx, g.init(f"{name}_code_lo", np.array(0, np.uint8)), g.init(f"{name}_code_hi", np.array(qm, np.uint8))],
                   f"{name}_codes")
    g.acts[name] = {"bits": a, "scale": s, "zero_point": z, "codes": [0, qm], "input": source, "output": qx,
                    "container": TensorProto.DataType.Name(dtype), "clip": clip, "zero_name": z_name, **extra}
    return g.add("DequantizeLinear", [qx, s_name, z_name], out)


def _point_qparams(q: QuantizedBackbone, point: str) -> tuple[float, int, int, int]:
    """(scale, zero point, top code, ONNX container type) of an activation point."""
    rng, a, _ = q.ranges[point]
    scale, zero, qmax = activation_qparams(a, rng[0], rng[1])
    s, z = float(scale), int(zero)
    return s, z, int(qmax), _act_container(a, z)[0]


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_module(node: fx.Node | None, mods: dict[str, nn.Module], kind: type) -> bool:
    return node is not None and node.op == "call_module" and isinstance(mods[str(node.target)], kind)


def _integer_plan(traced: fx.Graph, mods: dict[str, nn.Module], q: QuantizedBackbone, qlinear: bool) -> dict[str, dict[str, Any]]:
    """Which convs run as integer kernels, and how (fx node name -> step).

    A conv with quantized weights whose input is a UINT8 activation point (through an Identity
    or the ImageNet stem's max pool at most) runs ``ConvInteger`` on that point's codes; a BN
    reading only that conv is folded into the float epilogue. The file stores its integers as
    the ``storage`` form does (INT4 for ``w <= 4``, else INT8); a constant subgraph turns them into
    UINT8 ``w + 128`` with zero point 128, computed once when onnxruntime folds constants:
    onnxruntime's u8 x u8 kernels sum exactly on every x86 CPU (u8 x s8 ones may saturate int16
    without VNNI, see ``_INT16``), and its ConvInteger with INT8 weights measured 2.3x slower than
    with UINT8 ones (docs/RESULTS.md).
    In the ``qlinear`` form, such a conv followed by ``BN -> [ReLU] -> UINT8 quant point`` (ReLU
    only where that point's zero point is 0: onnxruntime drops such a Relu) becomes the QDQ
    pattern of QLinearConv (:func:`_fold`) where its weights allow it. Every other conv (the stem
    reads the float image) stays a float Conv.
    """
    points = {n.name: str(n.target).removeprefix("backbone.") for n in traced.nodes if _is_module(n, mods, ActQuant)}
    plan: dict[str, dict[str, Any]] = {}
    for node in traced.nodes:
        if not _is_module(node, mods, nn.Conv2d):
            continue
        name = str(node.target).removeprefix("backbone.")
        src, pool = node.args[0], None
        while isinstance(src, fx.Node) and (_is_module(src, mods, nn.Identity) or (pool is None and _is_module(src, mods, nn.MaxPool2d))):
            if _is_module(src, mods, nn.MaxPool2d):  # the ImageNet stem's: max pooling commutes with quantization
                pool = str(src.target)
            src = src.args[0]  # the CIFAR stem's maxpool is an Identity
        if f"{name}.weight" not in q.weights or not isinstance(src, fx.Node) or src.name not in points:
            continue
        in_point = points[src.name]
        s_x, z_x, qm_x, dtype = _point_qparams(q, in_point)
        if dtype != TensorProto.UINT8:
            continue
        step: dict[str, Any] = {"kernel": "ConvInteger", "input_point": in_point, "conv": name, "pool": pool,
                                "kernel_weights": "UINT8 w + 128, zero point 128"}
        bn = _single_user(node)
        if _is_module(bn, mods, nn.BatchNorm2d):
            assert bn is not None
            step.update(bn=bn.name, bn_module=str(bn.target).removeprefix("backbone."))
        if qlinear and "bn" in step:
            assert bn is not None
            nxt, fn = _single_user(bn), None
            if pool is None and _is_module(nxt, mods, nn.ReLU):
                fn, nxt = nxt, _single_user(nxt)  # type: ignore[arg-type]
            if pool is None and nxt is not None and nxt.name in points:
                out_point = points[nxt.name]
                _, z_y, _, dtype_y = _point_qparams(q, out_point)
                if dtype_y == TensorProto.UINT8 and (fn is None or z_y == 0):
                    folded = _fold(q, name, step["bn_module"], s_x, qm_x, float(mods[str(bn.target)].eps))  # type: ignore[arg-type]
                    if folded is not None:  # the INT32 bias is off the folded bias by at most half a unit of s_x * s_w'
                        step.update(kernel="QLinearConv", act=nxt.name, out_point=out_point,
                                    kernel_weights="INT8 w * multiplier, BN folded into the scales",
                                    bias_rounding_steps=float(folded["b_err"].max()) / _point_qparams(q, out_point)[0], **folded)
        plan[node.name] = step
    return plan


def _bn_affine(q: QuantizedBackbone, bn: str, eps: float) -> tuple[Tensor, Tensor]:
    """The eval-mode BN ``bn`` as ``y = x * inv + shift`` per channel, in float64."""
    inv = q.fp[f"{bn}.weight"].double() / torch.sqrt(q.fp[f"{bn}.running_var"].double() + eps)
    return inv, q.fp[f"{bn}.bias"].double() - q.fp[f"{bn}.running_mean"].double() * inv


def _fold(q: QuantizedBackbone, conv: str, bn: str, s_x: float, qm_x: int, eps: float) -> dict[str, Any] | None:
    """BN folded into the conv's per-channel weight scales and an INT32 bias in units of
    ``s_x * s_w'`` (QLinearConv's), or None where that cannot hold exactly enough.

    Each channel's integers are multiplied by ``M = limit // max|w|`` (and its scale divided by
    ``M``): the same products, but a bias unit ``M`` times finer. ``limit`` keeps ``|M w| <= 127``
    and every u8 x s8 pair sum within int16 (``_INT16``), so no x86 kernel can saturate; an 8-bit
    weight against 8-bit codes cannot meet that (None: it stays ConvInteger). A negative BN
    gamma flips the channel's integers, so every scale stays positive.
    """
    qw = q.weights[f"{conv}.weight"]
    if qw.ints.dim() != 4:
        return None
    out = qw.ints.shape[0]
    ints = qw.ints.to(torch.int64).reshape(out, -1)
    limit = min(127, _INT16 // (2 * qm_x))
    peak = ints.abs().amax(dim=1).clamp(min=1)
    if bool((peak > limit).any()):
        return None
    mult = limit // peak
    inv, bias = _bn_affine(q, bn, eps)
    sign = torch.where(inv < 0, -1, 1).to(torch.int64)
    w_scale = (qw.scale.double() * inv.abs() / mult.double()).float()
    b_scale = torch.tensor(s_x, dtype=torch.float32) * w_scale  # float32, as onnxruntime multiplies them
    if bool((b_scale < 1e-30).any()):
        return None
    b_int = torch.round(bias / b_scale.double())
    if bool((b_int.abs() > 2**31 - 1).any()):
        return None
    folded_ints = (ints * (mult * sign)[:, None]).reshape(qw.ints.shape)
    return {"w_scale": w_scale, "b_scale": b_scale, "b_int": b_int.to(torch.int32), "ints": folded_ints.to(torch.int8),
            "b_err": (b_int * b_scale.double() - bias).abs(), "multiplier": mult}


def _conv_fused(g: _Graph, mod: nn.Conv2d, x: str, out: str, step: dict[str, Any]) -> str:
    """``DQ(x) -> Conv(DQ(w'), DQ(b)) -> Q``, BN folded (:func:`_fold`): onnxruntime's QLinearConv."""
    name, n = step["conv"], step["ints"].shape[0]
    ints = g.init_weight_ints(f"{name}.weight_folded_q", step["ints"], TensorProto.INT8)
    w = g.add("DequantizeLinear", [ints, g.init(f"{name}.weight_folded_scale", step["w_scale"]),
                                   g.init(f"{name}.weight_folded_zero", np.zeros(n, np.int8))], f"{name}.weight_dq", axis=0)
    b = g.add("DequantizeLinear", [g.init(f"{name}.bias_q", step["b_int"]), g.init(f"{name}.bias_scale", step["b_scale"]),
                                   g.init(f"{name}.bias_zero", np.zeros(n, np.int32))], f"{name}.bias_dq", axis=0)
    return g.add("Conv", [x, w, b], out, **_conv_attrs(mod))


def _conv_integer(g: _Graph, mod: nn.Conv2d, out: str, q: QuantizedBackbone, step: dict[str, Any], bn: nn.Module | None,
                  pool: nn.Module | None) -> str:
    """``ConvInteger`` on the input point's codes (max-pooled first where the module pools), then ``Cast -> Mul -> Add`` in float: the exact
    INT32 sums times ``s_x * s_w[c]`` (times the BN's ``gamma / sigma`` when folded), plus the
    folded BN shift (and conv bias). Scale and shift are computed in float64, rounded once."""
    name = step["conv"]
    qw, p = q.weights[f"{name}.weight"], g.acts[step["input_point"]]
    # the checkpoint's integers as stored (INT4 / INT8), as UINT8 w + 128 for the kernel: constant
    # subgraph, computed once when onnxruntime folds constants
    stored = g.init_weight_ints(f"{name}.weight_q", qw.ints, TensorProto.INT4 if qw.bits <= 4 else TensorProto.INT8)
    wide = g.add("Cast", [stored], f"{name}.weight_i32", to=TensorProto.INT32)
    shifted = g.add("Add", [wide, g.init(f"{name}.weight_offset", np.array(128, np.int32))], f"{name}.weight_shifted")
    ints = g.add("Cast", [shifted], f"{name}.weight_u8", to=TensorProto.UINT8)
    w_zero = g.init(f"{name}.weight_zero", np.array(128, np.uint8))
    codes = p["output"] if pool is None else g.add("MaxPool", [p["output"]], f"{out}_pooled_codes", **_pool_attrs(pool))  # type: ignore[arg-type]
    acc = g.add("ConvInteger", [codes, ints, p["zero_name"], w_zero], f"{out}_acc", **_conv_attrs(mod))
    accf = g.add("Cast", [acc], f"{out}_accf", to=TensorProto.FLOAT)
    scale = torch.tensor(p["scale"], dtype=torch.float32).double() * qw.scale.double()
    shift = mod.bias.detach().double() if mod.bias is not None else None
    if bn is not None:
        assert isinstance(bn, nn.BatchNorm2d)
        inv, bn_shift = _bn_affine(q, step["bn_module"], float(bn.eps))
        shift = bn_shift + (shift * inv if shift is not None else 0.0)
        scale = scale * inv
    y = g.add("Mul", [accf, g.init(f"{name}.acc_scale", scale.float().reshape(1, -1, 1, 1))], out if shift is None else f"{out}_scaled")
    if shift is not None:
        y = g.add("Add", [y, g.init(f"{name}.shift", shift.float().reshape(1, -1, 1, 1))], out)
    return y


def build_onnx(q: QuantizedBackbone, head: dict[str, Tensor] | None = None, info: dict[str, Any] | None = None,
               form: str = "integer") -> onnx.ModelProto:
    """The ONNX model of ``q`` (+ FP ``head``) in ``form`` (``FORMS``); see the module docstring."""
    if form not in FORMS:
        raise ValueError(f"ONNX form must be one of {list(FORMS)}, got {form!r}")
    model = build_quantized_model(q, head)
    traced = _Tracer().trace(model)
    mods = dict(model.named_modules())
    g = _Graph()
    env: dict[str, str] = {}
    out_name = "logits" if head is not None else "features"
    integer = form != "storage" and not q.bits.is_fp
    plan = _integer_plan(traced, mods, q, form == "qlinear") if integer else {}
    folded_bn = {s["bn"]: s for s in plan.values() if "bn" in s}  # the conv's output already is its output
    fused_act = {s["act"]: s for s in plan.values() if s["kernel"] == "QLinearConv"}
    for node in traced.nodes:
        name = node.name
        args = [env[a.name] for a in node.args if isinstance(a, fx.Node)]
        if name in folded_bn:
            env[name] = args[0]
            continue
        if node.op == "placeholder":
            env[name] = "input"
        elif node.op == "output":
            result = node.args[0]
            assert isinstance(result, fx.Node)
            g.add("Identity", [env[result.name]], out_name)
        elif node.op == "call_module":
            target = str(node.target)
            mod, bname = mods[target], target.removeprefix("backbone.")
            if name in plan and plan[name]["kernel"] == "QLinearConv":
                env[name] = _conv_fused(g, mod, args[0], name, plan[name])  # type: ignore[arg-type]
            elif name in plan:
                step = plan[name]
                env[name] = _conv_integer(g, mod, name, q, step, mods[f"backbone.{step['bn_module']}"] if "bn" in step else None,  # type: ignore[arg-type]
                                          mods[step["pool"]] if step["pool"] else None)
            elif isinstance(mod, nn.Conv2d):
                # float weights only where the conv reads the image: given a DequantizeLinear input and
                # float weights, onnxruntime quantizes those weights itself (not our integers)
                reads_image = isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"
                env[name] = _conv(g, mod, args[0], name, q, bname, dequantized=integer and reads_image)
            elif isinstance(mod, ActQuant):
                extra = {}
                if name in fused_act:
                    extra["bias_rounding_steps"] = fused_act[name]["bias_rounding_steps"]
                env[name] = _act(g, args[0], name, q, bname, code_clip=integer, **extra)
            elif isinstance(mod, nn.BatchNorm2d):
                assert mod.running_mean is not None and mod.running_var is not None
                ins = [g.init(f"{bname}.{p}", t.float()) for p, t in
                       (("weight", mod.weight), ("bias", mod.bias), ("running_mean", mod.running_mean), ("running_var", mod.running_var))]
                env[name] = g.add("BatchNormalization", [args[0], *ins], name, epsilon=float(mod.eps))
            elif isinstance(mod, nn.ReLU):
                env[name] = g.add("Relu", args, name)
            elif isinstance(mod, nn.Identity):
                env[name] = args[0]
            elif isinstance(mod, nn.MaxPool2d):
                env[name] = g.add("MaxPool", args, name, **_pool_attrs(mod))
            elif isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
                env[name] = g.add("GlobalAveragePool", args, name)
            elif isinstance(mod, nn.Linear):
                ins = [g.init(f"{target}.weight", mod.weight.float()), g.init(f"{target}.bias", mod.bias.float())]
                env[name] = g.add("Gemm", [args[0], *ins], name, transB=1)
            else:
                raise ValueError(f"no ONNX mapping for module {target} ({type(mod).__name__})")
        elif node.op == "call_function":
            if node.target is operator.add:
                env[name] = g.add("Add", args, name)
            elif node.target is torch.flatten and node.args[1:] == (1,):
                env[name] = g.add("Flatten", args, name, axis=1)
            elif node.target is torch.nn.functional.hardtanh:
                lo, hi = node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0)
                bounds = [g.init(f"{name}_lo", np.array(lo, np.float32)), g.init(f"{name}_hi", np.array(hi, np.float32))]
                env[name] = g.add("Clip", [args[0], *bounds], name)
            else:
                raise ValueError(f"no ONNX mapping for function {node.target}")
        else:
            raise ValueError(f"no ONNX mapping for fx op {node.op} {node.target}")
    graph = helper.make_graph(
        g.nodes, f"ssql_{q.arch['name']}_{q.bits}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", head["weight"].shape[0] if head is not None else model.backbone.feat_dim])],
        initializer=g.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ssql_core.export")
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    mixed = isinstance(q.bits, BitConfig)
    # which convs run as integer kernels: ConvInteger as written; QLinearConv once onnxruntime
    # fuses the QDQ pattern (any graph optimisation level; tests read its optimised graph)
    convs = {s["conv"]: {"kernel": s["kernel"], "input_point": s["input_point"], "kernel_weights": s["kernel_weights"],
                         **({"bn_folded": s["bn_module"]} if "bn" in s else {}), **({"max_pool": s["pool"]} if s["pool"] else {}),
                         **({"output_point": s["out_point"], "weight_multiplier_max": int(s["multiplier"].max()),
                             "bias_rounding_steps": s["bias_rounding_steps"]}
                            if s["kernel"] == "QLinearConv" else {})} for s in plan.values()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": q.arch, "bits": str(q.bits),
                "weight_bits": None if mixed else q.bits.w, "act_bits": None if mixed else q.bits.a,  # type: ignore[union-attr]
                **({"bit_config": q.bits.as_dict(),  # type: ignore[union-attr]
                    "weights": {k: {"bits": w.bits, "container": _weight_container(k, convs, w.bits)} for k, w in q.weights.items()}}
                   if mixed else {}),
                "form": form, "bn_folded": any("bn_folded" in c for c in convs.values()), "integer_convs": convs,
                "float_convs": sorted(n.removeprefix("backbone.") for n, m in mods.items()
                                      if isinstance(m, nn.Conv2d) and n.removeprefix("backbone.") not in convs),
                "opset": OPSET, "rounding": q.rounding,
                "input": "input: float32 [N, 3, H, W], normalized as the run's test transform",
                "output": out_name, "activations": g.acts, **(info or {})}
    _set_meta(proto, manifest)
    return proto


def _weight_container(key: str, convs: dict[str, Any], bits: int) -> str:
    """How the file stores a weight's integers: INT4 / INT8, or INT8 for QLinearConv's multiplied ones."""
    if convs.get(key.removesuffix(".weight"), {}).get("kernel") == "QLinearConv":
        return "INT8"
    return "INT4" if bits <= 4 else "INT8"


def _digest(proto: onnx.ModelProto, manifest_json: str) -> str:
    return hashlib.sha256(manifest_json.encode() + proto.graph.SerializeToString(deterministic=True)).hexdigest()


def _set_meta(proto: onnx.ModelProto, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    for k, v in (("ssql.format", FORMAT), ("ssql.manifest", text), ("ssql.sha256", _digest(proto, text))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def write_onnx(path: str | Path, q: QuantizedBackbone, head: dict[str, Tensor] | None = None, info: dict[str, Any] | None = None,
               form: str = "integer") -> Path:
    """Write the ONNX model of ``q`` to ``path`` atomically; returns the path."""
    path = Path(path)
    proto = build_onnx(q, head, info, form)
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))


def _editable(path_or_proto: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the model that may be changed (graph outputs added) and its manifest."""
    if isinstance(path_or_proto, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(path_or_proto)
        return proto, json.loads({p.key: p.value for p in proto.metadata_props}["ssql.manifest"])
    return read_onnx(path_or_proto)


def read_onnx(path: str | Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Parse (no external data), hash-check and return ``(model, manifest)``; ``CheckpointError`` otherwise."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and OS errors
        raise CheckpointError(f"{path}: not a readable ONNX file (truncated or corrupted?): {e}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("ssql.format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} file")
    text = meta.get("ssql.manifest", "")
    if _digest(proto, text) != meta.get("ssql.sha256"):
        raise CheckpointError(f"{path}: sha256 mismatch: the graph was modified or corrupted after export")
    return proto, json.loads(text)


def onnx_session(path_or_proto: str | Path | onnx.ModelProto, optimize: bool = False) -> Any:
    """An onnxruntime CPU session; ``optimize=False`` runs the graph as written (QDQ unfused)."""
    import onnxruntime as ort

    proto = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else read_onnx(path_or_proto)[0]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_onnx(path_or_proto: str | Path | onnx.ModelProto, reference: QuantizedModel | nn.Module, x: Tensor,
                 optimize: bool = False) -> dict[str, float]:
    """Abs differences between onnxruntime and the PyTorch ``reference`` on ``x``, overall and per sample."""
    sess = onnx_session(path_or_proto, optimize)
    got = torch.from_numpy(sess.run(None, {"input": x.float().numpy()})[0])
    ref = reference(x).float()
    diff = (got - ref).abs()
    per_sample = diff.reshape(len(x), -1).max(dim=1).values
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "max_abs_ref": float(ref.abs().max()),
            "samples": len(x), "samples_within_1e-5": int((per_sample <= 1e-5).sum())}


def quant_point_agreement(path_or_proto: str | Path | onnx.ModelProto, x: Tensor) -> dict[str, Any]:
    """Do the graph's activation codes equal the fake quantizer's, given the graph's own inputs?

    Runs onnxruntime with every quant point's input and codes exposed, and recomputes the codes
    from that input with the PyTorch formula ``clamp(round(x * (1/s)) + z, 0, 2^a - 1)``. This checks
    the Clip/QuantizeLinear semantics (scale, zero point, clamping) exactly, independently of
    float differences upstream, which :func:`compare_onnx` sees compounded through the network.
    """
    proto, manifest = _editable(path_or_proto)
    points = manifest["activations"]
    names = []
    for p in points.values():
        proto.graph.output.append(helper.make_tensor_value_info(p["input"], TensorProto.FLOAT, None))
        proto.graph.output.append(helper.make_tensor_value_info(p["output"], TensorProto.DataType.Value(p["container"]), None))
        names += [p["input"], p["output"]]
    outs = onnx_session(proto).run(names, {"input": x.float().numpy()})
    total = mismatched = worst = 0
    for i, p in enumerate(points.values()):
        inp, got = torch.from_numpy(outs[2 * i]), torch.from_numpy(outs[2 * i + 1].astype(np.int64))
        scale = torch.tensor(p["scale"], dtype=torch.float32)
        expect = torch.clamp(torch.round(inp * (1.0 / scale)) + p["zero_point"], *p["codes"]).to(torch.int64)
        delta = (got - expect).abs()
        total += delta.numel()
        mismatched += int((delta > 0).sum())
        worst = max(worst, int(delta.max()) if delta.numel() else 0)
    return {"points": len(points), "elements": total, "mismatched": mismatched, "max_code_delta": worst}


def _points_of(reference: nn.Module) -> dict[str, ActQuant]:
    """``reference``'s activation points by backbone name (a QuantizedModel's or a bare backbone's)."""
    return {n.removeprefix("backbone."): m for n, m in reference.named_modules() if isinstance(m, ActQuant)}


@torch.no_grad()
def forced_code_agreement(path_or_proto: str | Path | onnx.ModelProto, reference: nn.Module, x: Tensor,
                          value_tol: float = 1e-3, optimize: bool = False) -> dict[str, Any]:
    """Per quantization point, the graph's activation codes against ``reference``'s on the same inputs.

    ``reference`` runs the quantized model in PyTorch (a :class:`QuantizedModel`, or the fake-quant
    backbone inside ``ctx.quantized(bits)`` wrapped by the caller); its codes at every point are
    read from what its quant points output. onnxruntime then runs the graph *teacher-forced*: every
    activation ``DequantizeLinear`` reads the reference's codes instead of the graph's own, so each
    segment between two quant points (conv, BN, ReLU, add, ...) computes from identical inputs and
    a float difference cannot compound through the network. Per point this returns the largest
    difference of the quant point's float input ``u = x / s`` (in steps), relative to
    ``max(1, |u|)`` (``max_value_diff``: float32 sums of the same terms in another order differ by
    about ``K * 2^-24`` of the value), the codes that differ (``flips``), and those of them *not*
    explained by float rounding (``unexplained``): a flip is explained when a rounding boundary
    ``k + 1/2`` lies between the two computed values (within 4 float32 ulps, which covers
    QuantizeLinear's ``x / s`` against ``x * (1/s)``). So ``unexplained == 0`` and
    ``max_value_diff <= value_tol`` together say: every differing code sat within
    ``value_tol * max(1, |u|)`` steps of a rounding boundary. A wrong scale, zero point, clip,
    rounding rule, BN, padding or weight moves values by a sizeable part of a step, or flips codes
    away from boundaries, and fails one of the two. In the ``integer`` form a point fed by a
    folded conv may further differ by its recorded ``bias_rounding_steps`` (QLinearConv's bias is
    an integer in units of ``s_x * s_w``): ``beyond_tol`` counts values off by more than both.
    ``optimize=True`` runs onnxruntime's fusions (QLinearConv, ...): only codes are exposed, and
    every flip must then lie within that allowance of a boundary (``ok``).
    The final output (logits or features) is compared too, from the forced last codes.
    """
    proto, manifest = _editable(path_or_proto)
    points = manifest["activations"]
    mods = _points_of(reference)
    missing = sorted(set(points) - set(mods))
    if missing:
        raise ValueError(f"the reference has no activation points {missing[:5]}")
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [mods[n].register_forward_hook(lambda _m, i, o, n=n: seen.__setitem__(n, (i[0].detach().float(), o.detach().float())))
             for n in points]
    try:
        ref_out = reference(x).float()
    finally:
        for h in hooks:
            h.remove()
    feeds: dict[str, np.ndarray] = {"input": x.float().numpy()}
    names: list[str] = []
    ref_codes: dict[str, Tensor] = {}
    for name, p in points.items():
        v_in, v_out = seen[name]
        s, z = torch.tensor(p["scale"], dtype=torch.float32), p["zero_point"]
        ref_codes[name] = torch.round(v_out / s).to(torch.int64) + z  # the reference's (q - z) * s, back to q
        forced = f"{p['output']}_forced"
        for node in proto.graph.node:  # its DequantizeLinear, and the ConvIntegers reading the codes
            for k, inp in enumerate(node.input):
                if inp == p["output"]:
                    node.input[k] = forced
        dtype = TensorProto.DataType.Value(p["container"])
        proto.graph.input.append(helper.make_tensor_value_info(forced, dtype, None))
        feeds[forced] = ref_codes[name].numpy().astype(helper.tensor_dtype_to_np_dtype(dtype))
        proto.graph.output.append(helper.make_tensor_value_info(p["output"], dtype, None))
        names.append(p["output"])
        if not optimize:  # a float graph output would keep onnxruntime from fusing its producer away
            proto.graph.output.append(helper.make_tensor_value_info(p["input"], TensorProto.FLOAT, None))
            names.append(p["input"])
    out_name = manifest["output"]
    outs = onnx_session(proto, optimize).run([out_name, *names], feeds)
    per_point: dict[str, dict[str, Any]] = {}
    total = {"elements": 0, "flips": 0, "unexplained": 0, "beyond_tol": 0, "max_value_diff": 0.0}
    step = 2 if not optimize else 1
    for i, (name, p) in enumerate(points.items()):
        got = torch.from_numpy(outs[1 + step * i].astype(np.int64))
        s = float(np.float32(p["scale"]))
        u_ref = seen[name][0].double() / s
        # what may differ, in steps: float rounding, and the INT32 bias of a folded conv (recorded per point)
        allowed = value_tol * torch.clamp(u_ref.abs(), min=1.0) + float(p.get("bias_rounding_steps", 0.0))
        flip = got != ref_codes[name]
        slack = 4 * float(np.finfo(np.float32).eps) * torch.clamp(u_ref.abs(), min=1.0)
        if optimize:  # fused kernels: no float input to read; a flip must sit within ``allowed`` of a boundary
            near = (u_ref - torch.floor(u_ref) - 0.5).abs() <= allowed + slack
            explained, beyond, rel = near, torch.zeros_like(flip), torch.zeros(())
        else:
            u_ort = torch.from_numpy(outs[2 + 2 * i]).double() / s
            lo, hi = torch.minimum(u_ref, u_ort), torch.maximum(u_ref, u_ort)
            boundary = torch.ceil(lo - slack - 0.5) + 0.5  # the first k + 1/2 at or above lo - slack
            explained = boundary <= hi + slack
            beyond = (u_ort - u_ref).abs() > allowed
            rel = (u_ort - u_ref).abs() / torch.clamp(u_ref.abs(), min=1.0)
        row = {"elements": got.numel(), "flips": int(flip.sum()), "unexplained": int((flip & ~explained).sum()),
               "beyond_tol": int(beyond.sum()), "max_value_diff": float(rel.max()) if got.numel() else 0.0, "bits": p["bits"],
               "bias_rounding_steps": float(p.get("bias_rounding_steps", 0.0))}
        per_point[name] = row
        for k in ("elements", "flips", "unexplained", "beyond_tol"):
            total[k] += row[k]
        total["max_value_diff"] = max(total["max_value_diff"], row["max_value_diff"])
    got_out = torch.from_numpy(outs[0])
    result = {**total, "points": per_point, "value_tol": value_tol,
              "ok": total["unexplained"] == 0 and total["beyond_tol"] == 0, "optimized": optimize,
              "output_max_abs_diff": float((got_out - ref_out).abs().max()), "output_max_abs": float(ref_out.abs().max())}
    if out_name == "logits":  # a classifier: do the forced graph's predictions differ, and how close were the top two?
        top2 = ref_out.topk(min(2, ref_out.shape[1]), dim=1).values
        result["predictions_differ"] = int((got_out.argmax(1) != ref_out.argmax(1)).sum())
        result["min_top2_gap"] = float((top2[:, 0] - top2[:, -1]).min())
    return result
