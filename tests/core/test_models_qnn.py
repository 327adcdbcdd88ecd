"""Backbones keep torchvision's names; FP and quantized passes share one copy of weights."""

import pytest
import torch
import torchvision
from torch import nn

from ssql_core.models import BACKBONES, MLPSpec, build_backbone
from ssql_core.qnn import FIXED8, Mode, QuantContext, act_points, bind_context, weight_points


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_loads_into_torchvision_strict(name):
    ours = build_backbone(name, "imagenet", 1.0)
    ref = getattr(torchvision.models, name)(weights=None)
    if name == "mobilenet_v2":
        ref.classifier = nn.Identity()
    else:
        ref.fc = nn.Identity()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x))


def test_cifar_stem_loads_into_adapted_torchvision():
    ours = build_backbone("resnet18", "cifar", 1.0)
    ref = torchvision.models.resnet18(weights=None)
    ref.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    ref.maxpool, ref.fc = nn.Identity(), nn.Identity()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))


def test_width_multiplier_and_layout():
    m = build_backbone("resnet18", "cifar", 0.125)
    assert m.conv1.out_channels == 8 and m.feat_dim == 64
    assert m.conv1.role == FIXED8 and m.act_stem.role == FIXED8
    roles = {n: p.role for n, p in weight_points(m).items()}
    assert roles["conv1"] == FIXED8 and all(r == "step" for n, r in roles.items() if n != "conv1")
    # per BasicBlock: after conv1-BN-ReLU and at the block output; conv2 / downsample outputs not
    names = set(act_points(m))
    assert {"layer1.0.act1", "layer1.0.act_out", "layer2.0.act_out"} <= names
    assert len(names) == 1 + 2 * 8


def _tiny():
    m = build_backbone("resnet18", "cifar", 0.0625)
    return m, bind_context(m)


def test_quantized_pass_shares_parameter_storage_and_gradients():
    m, ctx = _tiny()
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    x = torch.randn(4, 3, 16, 16)
    with ctx.recording():
        y_fp = m(x)
    with ctx.quantized("3w4a"):
        y_q = m(x)
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == ptrs
    assert not torch.allclose(y_fp, y_q)
    y_q.sum().backward()
    assert m.layer1[0].conv1.weight.grad is not None and m.conv1.weight.grad.abs().sum() > 0
    with ctx.mode_as(Mode.FP):
        torch.testing.assert_close(m(x), y_fp)  # FP output unchanged after quantized use


def test_record_mode_takes_union_over_views():
    m, ctx = _tiny()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 3
    pts = list(act_points(m).values())
    ranges = []
    for x in (x1, x2):
        with ctx.recording():
            m(x)
        ranges.append([(float(p.lo), float(p.hi)) for p in pts])
    with ctx.recording():
        m(x1)
    with ctx.recording(reset=False):
        m(x2)
    for p, (a, b) in zip(pts, zip(*ranges, strict=True), strict=True):
        assert float(p.lo) == pytest.approx(min(a[0], b[0])) and float(p.hi) == pytest.approx(max(a[1], b[1]))


def test_bit_switch_does_not_recompile():
    m, ctx = _tiny()
    m.eval()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(m, backend=counting_backend)
    x = torch.randn(2, 3, 16, 16)
    with ctx.recording():
        compiled(x)
    outs = {}
    for bits in ["8w8a", "4w4a", "2w4a", "3w5a"]:
        with ctx.quantized(bits):
            outs[bits] = compiled(x)
            with ctx.quantized(bits):
                torch.testing.assert_close(outs[bits], m(x))
    assert len(graphs) == 2, f"expected one graph for RECORD and one for QUANT, got {len(graphs)}"
    assert not torch.allclose(outs["8w8a"], outs["2w4a"])


def test_mobilenet_quant_points():
    m = build_backbone("mobilenet_v2", "cifar", 0.25)
    ctx = bind_context(m)
    x = torch.randn(2, 3, 16, 16)
    with ctx.recording():
        y = m(x)
    with ctx.quantized("4w4a"):
        yq = m(x)
    assert y.shape == yq.shape == (2, m.feat_dim) and not torch.allclose(y, yq)
    assert m.features[0][0].role == FIXED8


def test_unbound_model_is_fp_and_context_default():
    m = build_backbone("resnet18", "cifar", 0.0625)
    ctx = QuantContext()
    ctx.set_bits("2w2a")  # a context not bound to m does not affect it
    m.eval()
    x = torch.randn(1, 3, 16, 16)
    with ctx.quantized("2w2a"):
        torch.testing.assert_close(m(x), m(x))


def test_mlp_spec_builds_simsiam_projector():
    proj = MLPSpec((64, 128, 128, 128), last_bn=True, last_bn_affine=False, quantized=True).build()
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["QLinear", "BatchNorm1d", "ReLU", "QLinear", "BatchNorm1d", "ReLU", "QLinear", "BatchNorm1d"]
    assert proj[-1].affine is False and proj[0].bias is None


def test_reused_quantized_weights_match_fresh_ones_and_sum_gradients():
    torch.manual_seed(0)
    m, ctx = _tiny()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    with ctx.recording():
        m(x1), m(x2)
    grads = []
    for reuse in (False, True):
        m.zero_grad()
        with ctx.quantized("3w5a", reuse_weights=reuse):
            y = m(x1).sum() + 2 * m(x2).sum()
        y.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    # a weight change inside the block (not promised, but detected) re-quantizes
    with ctx.quantized("3w5a", reuse_weights=True):
        a = m.layer1[0].conv1.quant_weight()
        with torch.no_grad():
            m.layer1[0].conv1.weight.mul_(2)
        b = m.layer1[0].conv1.quant_weight()
        assert a is not b and torch.allclose(b, 2 * a)
