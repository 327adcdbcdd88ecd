"""The ONNX graph's forms: integer kernels (ConvInteger / QLinearConv) that still compute the
evaluated model, checked code by code and on the graph onnxruntime actually runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ssql_core.export.onnx_graph import (
    FORMS,
    build_onnx,
    forced_code_agreement,
    read_onnx,
    write_onnx,
)
from ssql_core.export.quantized import build_quantized_model, quantize_backbone
from tests.core.test_export_roundtrip import calibrated

BITS = ["8w8a", "6w6a", "4w4a", "2w4a", "3w8a", "8w3a", "2w2a"]


@pytest.fixture(scope="module")
def small() -> nn.Module:
    return calibrated(seed=4)


def _manifest(proto: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in proto.metadata_props}["ssql.manifest"])


def optimized_ops(proto: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types of the graph onnxruntime runs after all its optimisations (written by ORT itself)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_computes_the_evaluated_model_code_by_code(small: nn.Module, form: str) -> None:
    """Teacher-forced, as written and as onnxruntime optimises it: a code differs from the PyTorch
    model's only within float rounding of a .5 boundary, plus, after a QLinearConv, the recorded
    rounding of its INT32 bias (a fraction of a step, not a step)."""
    x = 2 * torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # beyond the range too
    head = {"weight": torch.randn(10, small.feat_dim, generator=torch.Generator().manual_seed(2)), "bias": torch.zeros(10)}
    flips = elements = 0
    for bits in BITS:
        q = quantize_backbone(small, bits)
        proto = build_onnx(q, head, form=form)
        reference = build_quantized_model(q, head)
        for optimize in (False, True):
            r = forced_code_agreement(proto, reference, x, optimize=optimize)
            assert r["ok"] and r["unexplained"] == 0 and r["beyond_tol"] == 0, (form, bits, optimize, r["unexplained"], r["beyond_tol"])
            flips, elements = flips + r["flips"], elements + r["elements"]
        steps = [p.get("bias_rounding_steps", 0.0) for p in _manifest(proto)["activations"].values()]
        assert max(steps) <= 0.05, (bits, max(steps))  # the weight multiplier keeps the bias unit fine
        if form != "qlinear":
            assert max(steps) == 0.0 and r["max_value_diff"] <= 1e-3  # no rounded bias: float rounding only
    assert elements > 100_000 and flips <= 1e-3 * elements, (flips, elements)


@pytest.mark.parametrize("bits", ["8w8a", "4w4a", "2w4a", "5w3a"])
def test_optimized_graph_runs_the_integer_kernels_the_manifest_names(small: nn.Module, bits: str, tmp_path: Path) -> None:
    n_convs = sum(isinstance(m, nn.Conv2d) for m in small.modules())
    for form in FORMS:
        proto = build_onnx(quantize_backbone(small, bits), form=form)
        manifest = _manifest(proto)
        planned = Counter(c["kernel"] for c in manifest["integer_convs"].values())
        ops = optimized_ops(proto, tmp_path)
        float_convs = ops["Conv"] + ops["FusedConv"]
        assert manifest["form"] == form
        assert ops["ConvInteger"] == planned["ConvInteger"] and ops["QLinearConv"] == planned["QLinearConv"], (form, ops, planned)
        assert float_convs == len(manifest["float_convs"]) == n_convs - sum(planned.values()), (form, ops)
        if form == "storage":
            assert not planned and float_convs == n_convs and ops["BatchNormalization"] > 0
            continue
        # every conv but the stem (it reads the float image) runs on integers; no BN is left
        assert manifest["float_convs"] == ["conv1"] and ops["BatchNormalization"] == 0, (form, ops)
        if form == "qlinear" and bits != "8w8a":  # each block's conv -> bn -> relu -> quant point fuses
            assert planned["QLinearConv"] >= 8, planned
        if bits == "8w8a":  # 8-bit weights against 8-bit codes could saturate a u8 x s8 kernel: ConvInteger (u8 x u8)
            assert planned["QLinearConv"] == 0


def test_integer_weights_are_the_checkpoints(small: nn.Module, tmp_path: Path) -> None:
    """ConvInteger's weights are the packed integers themselves, stored INT4 / INT8 as in the
    storage form (the UINT8 ``w + 128`` the kernel reads is folded in when the session loads: no
    Cast remains on them); QLinearConv's are those times a per-channel multiplier (and the BN
    gamma's sign), within INT8."""
    from onnx import TensorProto, numpy_helper

    for bits in ("4w3a", "6w5a"):
        q = quantize_backbone(small, bits)
        proto = build_onnx(q, form="qlinear")
        inits = {t.name: t for t in proto.graph.initializer}
        convs = _manifest(proto)["integer_convs"]
        assert Counter(c["kernel"] for c in convs.values())["QLinearConv"] >= 8
        for conv, c in convs.items():
            ints = q.weights[f"{conv}.weight"].ints.numpy().astype(np.int64)
            if c["kernel"] == "ConvInteger":
                t = inits[f"{conv}.weight_q"]
                assert t.data_type == (TensorProto.INT4 if bits[0] == "4" else TensorProto.INT8)
                assert np.array_equal(numpy_helper.to_array(t).astype(np.int64), ints), conv
                continue
            got = numpy_helper.to_array(inits[f"{conv}.weight_folded_q"]).astype(np.int64).reshape(len(ints), -1)
            mult = np.abs(got).max(axis=1) // np.maximum(np.abs(ints).reshape(len(ints), -1).max(axis=1), 1)
            assert np.all(mult >= 1) and np.all(np.abs(got) <= 127), conv
            assert np.array_equal(np.abs(got), np.abs(ints.reshape(len(ints), -1)) * mult[:, None]), conv
        ops = optimized_ops(proto, tmp_path)
        assert ops["Cast"] == ops["ConvInteger"]  # only each INT32 sum's, none left on the weights


def test_other_architectures_and_the_imagenet_stem(tmp_path: Path) -> None:
    """MobileNetV2 (ReLU6, depthwise convs, projections with negative zero points) and the
    ImageNet stem's max pool (pooled on the codes before ConvInteger): codes agree, and no float
    Conv but the stem remains once onnxruntime has optimised the graph."""
    for bb, size in ((calibrated(0.25, seed=2, name="mobilenet_v2"), 16), (calibrated(seed=3, size=32, stem="imagenet"), 32)):
        x = 2 * torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(5))
        for form in ("integer", "qlinear"):
            for bits in ("4w4a", "8w8a"):
                q = quantize_backbone(bb, bits)
                proto = build_onnx(q, form=form)
                for optimize in (False, True):
                    r = forced_code_agreement(proto, build_quantized_model(q), x, optimize=optimize)
                    assert r["ok"], (bb.arch, form, bits, optimize, r["unexplained"], r["beyond_tol"])
                ops = optimized_ops(proto, tmp_path)
                assert ops["Conv"] + ops["FusedConv"] == 1 and ops["ConvInteger"] + ops["QLinearConv"] > 10, (bb.arch, ops)


def test_forms_on_disk_and_refused_form(small: nn.Module, tmp_path: Path) -> None:
    q = quantize_backbone(small, "4w4a")
    sizes = {}
    for form in FORMS:
        path = write_onnx(tmp_path / f"{form}.onnx", q, form=form)
        assert read_onnx(path)[1]["form"] == form
        sizes[form] = path.stat().st_size
    # INT4 weights in both; QLinearConv's multiplied ones need INT8
    assert sizes["storage"] < sizes["qlinear"] and sizes["integer"] < sizes["qlinear"], sizes
    with pytest.raises(ValueError, match="ONNX form"):
        build_onnx(q, form="int4")
