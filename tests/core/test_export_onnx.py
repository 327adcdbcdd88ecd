"""ONNX QDQ export checked against the PyTorch fake-quant model with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ssql_core.export import CheckpointError, fake_quant_reference, load_quantized
from ssql_core.export.format import write_quantized
from ssql_core.export.onnx_graph import (
    build_onnx,
    compare_onnx,
    forced_code_agreement,
    onnx_session,
    quant_point_agreement,
    read_onnx,
    write_onnx,
)
from ssql_core.export.quantized import build_quantized_model, quantize_backbone
from ssql_core.qnn import QuantContext, act_points, bind_context
from tests.core.test_export_roundtrip import calibrated


@pytest.fixture(scope="module")
def small() -> nn.Module:
    return calibrated()


@pytest.mark.parametrize("w", range(2, 9))
def test_onnx_matches_pytorch_every_bit_width(small: nn.Module, w: int, record_property) -> None:
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(w))
    worst = 0.0
    for a in range(2, 9):
        q = quantize_backbone(small, f"{w}w{a}a")
        r = compare_onnx(build_onnx(q), build_quantized_model(q), x)
        worst = max(worst, r["max_abs_diff"])
        # float summation order may flip one code on a rounding boundary in a rare sample; a wrong
        # scale, zero point, clip or axis would change every sample
        assert r["samples_within_1e-5"] >= r["samples"] - 1, (w, a, r)
        assert r["mean_abs_diff"] <= 1e-3 * r["max_abs_ref"], (w, a, r)
    record_property("max_abs_diff", worst)
    print(f"{w}w*a: onnxruntime vs PyTorch max abs diff {worst:.3g}")


@pytest.mark.parametrize("bits", ["2w2a", "3w6a", "4w4a", "8w8a"])
def test_activation_codes_equal_the_fake_quantizer_on_the_graphs_own_inputs(small: nn.Module, bits: str) -> None:
    # isolates Clip/QuantizeLinear semantics from upstream float differences that compound
    x = 2 * torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # beyond the range too
    r = quant_point_agreement(build_onnx(quantize_backbone(small, bits)), x)
    assert r["points"] == len(act_points(small)) and r["elements"] > 50_000
    assert r["mismatched"] == 0, r


class _FakeQuant(nn.Module):
    """The evaluated model: the calibrated backbone's fake-quant forward at ``bits``."""

    def __init__(self, backbone: nn.Module, ctx: QuantContext, bits: str) -> None:
        super().__init__()
        self.backbone, self.ctx, self.bits = backbone, ctx, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.ctx.quantized(self.bits):
            return self.backbone(x)


@pytest.mark.parametrize("rounding", ["reciprocal", "divide"])
def test_onnx_codes_equal_the_evaluated_model_at_every_bit_width(rounding: str, tmp_path: Path) -> None:
    """Teacher-forced, point by point: the graph's codes are the fake-quant model's, except where a
    value sits within float rounding of a .5 boundary (counted; none elsewhere). The reference
    preset's ``x / s`` rounding once exported ``x * (1/s)`` integers: every channel's largest weight
    (on a .5 tie by construction) could land one step off, and values moved by up to a step."""
    bb = calibrated(seed=5)
    ctx = bind_context(bb, QuantContext(rounding=rounding))
    x = 2 * torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # beyond the range too
    head = {"weight": torch.randn(10, bb.feat_dim, generator=torch.Generator().manual_seed(2)), "bias": torch.zeros(10)}
    flips = 0
    for bits in [f"{w}w{w}a" for w in range(2, 9)] + ["2w4a", "4w8a", "8w3a"]:
        q = quantize_backbone(bb, bits)  # the bound context's rounding
        assert q.rounding == rounding
        reference = _FakeQuant(bb, ctx, bits)
        r = forced_code_agreement(build_onnx(q, head), build_quantized_model(q, head), x)
        assert r["ok"] and r["unexplained"] == 0 and r["max_value_diff"] <= 1e-3, (bits, r["max_value_diff"], r["unexplained"])
        assert r["elements"] > 100_000 and r["output_max_abs_diff"] <= 1e-4 * r["output_max_abs"], (bits, r)
        flips += r["flips"]
        # against the evaluated (fake-quant) backbone itself, and the packed file reloads it bit for bit
        assert forced_code_agreement(build_onnx(q), reference, x)["ok"], bits
        model = load_quantized(write_quantized(tmp_path / f"{bits}.safetensors", q))
        assert model.manifest["rounding"] == rounding and model.ctx.rounding == rounding
        with torch.no_grad():
            assert torch.equal(model(x), reference(x)), bits
    assert flips <= 1e-4 * 10 * r["elements"]  # ulp-level boundary cases only: a handful in 2.8 M codes


def test_imagenet_stem_with_maxpool(tmp_path: Path) -> None:
    bb = calibrated(seed=3, size=32, stem="imagenet")
    x = torch.randn(4, 3, 32, 32)
    for bits in ("fp", "5w3a"):
        q = quantize_backbone(bb, bits)
        r = compare_onnx(build_onnx(q), build_quantized_model(q), x)
        assert r["samples_within_1e-5"] >= 3, (bits, r)
    assert quant_point_agreement(build_onnx(quantize_backbone(bb, "5w3a")), x)["mismatched"] == 0


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


@pytest.mark.parametrize("bits", ["2w3a", "4w4a", "5w7a", "8w8a"])
def test_graph_holds_integers_at_the_bit_width(small: nn.Module, bits: str) -> None:
    w, a = int(bits[0]), int(bits[2])
    q = quantize_backbone(small, bits)
    proto = build_onnx(q, form="storage")  # the smallest file: INT4 weights at w <= 4, every conv as DQ -> Conv
    inits = _initializers(proto)
    dq_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_q")]
    assert len(dq_weights) == sum(isinstance(m, nn.Conv2d) for m in small.modules())
    for node in dq_weights:
        t = inits[node.input[0]]
        stem = node.input[0] == "conv1.weight_q"
        b = 8 if stem else w
        assert t.data_type == (TensorProto.INT4 if b <= 4 else TensorProto.INT8)
        vals = numpy_helper.to_array(t).astype(np.int64)
        assert vals.min() >= -(1 << (b - 1)) and vals.max() <= (1 << (b - 1)) - 1
        assert np.array_equal(vals, q.weights[node.input[0].removesuffix("_q")].ints.numpy())
        assert helper.get_attribute_value(node.attribute[0]) == 0  # axis 0: per output channel
        assert numpy_helper.to_array(inits[node.input[1]]).shape == (vals.shape[0],)
    # every activation point is one QuantizeLinear; run the graph with the codes as outputs
    qnodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qnodes) == len(act_points(small))
    for n in qnodes:
        proto.graph.output.append(helper.make_tensor_value_info(n.output[0], TensorProto.UINT8, None))
    # inputs 4x the calibration's scale: values beyond the range must clip to the top code, not wrap
    x = 4 * np.random.default_rng(0).standard_normal((4, 3, 16, 16), np.float32)
    codes = onnx_session(proto).run([n.output[0] for n in qnodes], {"input": x})
    for n, c in zip(qnodes, codes, strict=True):
        bits_here = 8 if n.output[0] == "act_stem_q" else a
        assert c.dtype == np.uint8 and int(c.max()) <= (1 << bits_here) - 1, n.output[0]
    assert max(int(c.max()) for c in codes[1:]) == (1 << a) - 1  # saturates at 2^a - 1
    clips = {n.output[0] for n in proto.graph.node if n.op_type == "Clip"}
    assert ("layer1.0.act1_clip" in clips) == (a < 8)


def test_classifier_and_mobilenet(small: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(6, 3, 16, 16)
    head = {"weight": torch.randn(5, small.feat_dim), "bias": torch.randn(5)}
    q = quantize_backbone(small, "3w4a")
    path = write_onnx(tmp_path / "c.onnx", q, head, {"source": {"job": "j1"}})
    proto, manifest = read_onnx(path)
    assert manifest["bits"] == "3w4a" and manifest["source"]["job"] == "j1" and manifest["output"] == "logits"
    r = compare_onnx(path, build_quantized_model(q, head), x)
    assert r["samples_within_1e-5"] >= 5 and r["max_abs_ref"] > 0
    mb = calibrated(0.25, seed=2, name="mobilenet_v2")
    qm = quantize_backbone(mb, "4w6a")
    r = compare_onnx(build_onnx(qm), build_quantized_model(qm), x)
    assert r["samples_within_1e-5"] >= 5, r
    with torch.no_grad():
        assert torch.allclose(build_quantized_model(qm)(x), fake_quant_reference(mb, "4w6a", x), atol=1e-5)
    fp = quantize_backbone(small, "fp")
    assert compare_onnx(build_onnx(fp), build_quantized_model(fp), x)["max_abs_diff"] <= 1e-4


def test_tampered_or_truncated_onnx_refused(small: nn.Module, tmp_path: Path) -> None:
    path = write_onnx(tmp_path / "m.onnx", quantize_backbone(small, "4w4a"))
    data = path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_onnx(bad)
    proto = onnx.load(str(path))
    t = proto.graph.initializer[0]
    arr = numpy_helper.to_array(t).copy()
    arr.reshape(-1)[0] += 1
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="sha256"):
        read_onnx(bad)
