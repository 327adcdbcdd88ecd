"""Quantizers: forward values and gradients on hand-computed cases, export grids, attachment."""

from __future__ import annotations

import math

import pytest
import torch

from ssql_core.models import build_backbone
from ssql_core.qnn import bind_context
from ssql_core.quantizers import QUANTIZER_NAMES, TensorStats, build_quantizer
from ssql_core.quantizers.attach import attach, init_quantizers, quantizer_parameters
from ssql_core.quantizers.dorefa import DoReFaAct, DoReFaWeight
from ssql_core.quantizers.ewgs import EWGSAct, EWGSWeight
from ssql_core.quantizers.lsq import LSQAct, LSQWeight
from ssql_core.quantizers.pact import PACTAct
from ssql_core.quantizers.psq import PSQAct, PSQWeight


def t(*v: float, grad: bool = True) -> torch.Tensor:
    return torch.tensor(v, requires_grad=grad)


def close(a: torch.Tensor, b: object, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.detach().float(), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# -- PSQ ------------------------------------------------------------------------------------
def test_psq_weight_values_and_boundary_inclusive_ste() -> None:
    w = torch.tensor([[-1.0, 0.5, 1.0]], requires_grad=True)
    out = PSQWeight(2)(w)
    # s = 1 / 1.5; w/s = -1.5, 0.75, 1.5 -> -2, 1, 2 (out of [-2, 1]: clamped to 1, zero gradient)
    close(out, [[-4 / 3, 2 / 3, 2 / 3]])
    out.sum().backward()
    close(w.grad, [[1.0, 1.0, 0.0]])


def test_psq_weight_matches_torch_fake_quant() -> None:
    w = torch.randn(4, 3, 3, 3)
    q = PSQWeight(4)(w)
    s = w.abs().amax(dim=(1, 2, 3)) / 7.5
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(4, dtype=torch.int32), 0, -8, 7)
    close(q, ref)


def test_psq_act_running_range() -> None:
    q = PSQAct(2)
    q.init_from(TensorStats.of(torch.tensor([0.0, 1.0])))
    q.eval()
    # s = 1/3: 0, 0.9 -> 1, 3
    close(q(torch.tensor([0.0, 0.3, 1.0])), [0.0, 1 / 3, 1.0])
    q.train()
    q(torch.tensor([-1.0, 2.0]))
    close(q.lo, -0.1)
    close(q.hi, 1.1)


# -- PACT -----------------------------------------------------------------------------------
def test_pact_unsigned_values_and_gradients() -> None:
    q = PACTAct(2)
    with torch.no_grad():
        q.alpha.fill_(3.0)
    x = t(-1.0, 0.4, 1.6, 2.5, 3.0, 5.0)
    out = q(x)
    close(out, [0.0, 0.0, 2.0, 2.0, 3.0, 3.0])  # s = 1, 2.5 rounds half to even
    (out * torch.arange(1.0, 7.0)).sum().backward()
    close(x.grad, [0.0, 2.0, 3.0, 4.0, 0.0, 0.0])  # 1 on [0, alpha)
    close(q.alpha.grad, 5.0 + 6.0)  # sum of g where x >= alpha


def test_pact_signed_values_and_gradients() -> None:
    q = PACTAct(3, signed=True)
    with torch.no_grad():
        q.alpha.fill_(1.5)
    x = t(-2.0, -0.6, 0.2, 1.5)
    out = q(x)
    close(out, [-1.5, -0.5, 0.0, 1.5])  # 3 levels per side, s = 0.5
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    close(x.grad, [0.0, 2.0, 3.0, 0.0])
    close(q.alpha.grad, 4.0 - 1.0)


def test_pact_init_from_calibration_max() -> None:
    q = PACTAct(4)
    q.init_from(TensorStats.of(torch.tensor([0.0, 2.5, 1.0])))
    close(q.alpha, 2.5)


# -- LSQ ------------------------------------------------------------------------------------
def test_lsq_unsigned_values_and_gradients() -> None:
    q = LSQAct(2)
    with torch.no_grad():
        q.step.fill_(0.5)
    x = t(-0.2, 0.3, 0.8, 1.5, 2.0)
    out = q(x)
    close(out, [0.0, 0.5, 1.0, 1.5, 1.5])
    out.sum().backward()
    close(x.grad, [0.0, 1.0, 1.0, 0.0, 0.0])
    # ds: -Qn=0 below, round(v)-v = 0.4, 0.4 inside, Qp=3 at/above; scaled by 1/sqrt(N Qp)
    close(q.step.grad, (0.0 + 0.4 + 0.4 + 3.0 + 3.0) / math.sqrt(5 * 3))


def test_lsq_signed_weight_values_and_gradients() -> None:
    q = LSQWeight(2)
    with torch.no_grad():
        q.step.fill_(1.0)
    w = t(-3.0, -1.2, 0.4, 0.6)
    out = q(w)
    close(out, [-2.0, -1.0, 0.0, 1.0])  # Qn = 2, Qp = 1
    out.sum().backward()
    close(w.grad, [0.0, 1.0, 1.0, 1.0])
    close(q.step.grad, (-2.0 + 0.2 - 0.4 + 0.4) / math.sqrt(4 * 1))


def test_lsq_init() -> None:
    q = LSQAct(4)
    q.init_from(TensorStats.of(torch.tensor([-1.0, 1.0, 2.0, -2.0])))
    close(q.step, 2 * 1.5 / math.sqrt(15))


# -- DoReFa ---------------------------------------------------------------------------------
def test_dorefa_weight_values_and_gradients() -> None:
    w = t(-1.0, -0.2, 0.1, 0.5)
    out = DoReFaWeight(2)(w)
    # w_n = tanh(w) / (2 tanh(1)) + 1/2 = 0, .370, .565, .803 -> 3 w_n rounds to 0, 1, 2, 2
    close(out, [-1.0, -1 / 3, 1 / 3, 1 / 3])
    out.sum().backward()
    m = math.tanh(1.0)
    close(w.grad, [(1 - math.tanh(v) ** 2) / m for v in (-1.0, -0.2, 0.1, 0.5)])


def test_dorefa_act_fixed_clip() -> None:
    q = DoReFaAct(2)
    q.init_from(TensorStats.of(torch.tensor([0.0, 2.0])))
    x = t(-1.0, 0.5, 1.0, 2.5)
    out = q(x)
    close(out, [0.0, 2 / 3, 4 / 3, 2.0])
    out.sum().backward()
    close(x.grad, [0.0, 1.0, 1.0, 0.0])
    assert not any(p.requires_grad for p in q.parameters())


# -- EWGS -----------------------------------------------------------------------------------
def test_ewgs_act_values_and_scaled_gradients() -> None:
    q = EWGSAct(2, delta=0.5)
    with torch.no_grad():
        q.u.fill_(3.0)
    x = t(0.4, 1.6, 2.5, 4.0)
    out = q(x)
    close(out, [0.0, 2.0, 2.0, 3.0])  # v = x/u*3 = 0.4, 1.6, 2.5, (clipped) 3
    g = torch.tensor([1.0, -1.0, 2.0, 1.0])
    (out * g).sum().backward()
    # g_v = g + delta |g| (v - q); dv/dx = n/u = 1 inside, dout/dq = u/n = 1
    gv = [1 + 0.5 * 0.4, -1 + 0.5 * -0.4, 2 + 0.5 * 2 * 0.5, 1.0]
    close(x.grad, [gv[0], gv[1], gv[2], 0.0])
    # u: direct q/n * g, plus g_v * dv/du = g_v * (-x n / u^2) inside the clip interval
    g_u = sum(qq / 3 * gg for qq, gg in zip([0, 2, 2, 3], g.tolist(), strict=True))
    g_u += sum(gv[i] * (-xx * 3 / 9) for i, xx in enumerate([0.4, 1.6, 2.5]))
    close(q.u.grad, g_u)


def test_ewgs_zero_delta_is_ste_and_weight_grid() -> None:
    q = EWGSWeight(2, delta=0.0)
    with torch.no_grad():
        q.u.fill_(1.0)
    w = t(-1.0, -0.2, 0.3, 1.0)
    out = q(w)
    close(out, [-1.0, -1 / 3, 1 / 3, 1.0])
    out.sum().backward()
    close(w.grad, [1.0, 1.0, 1.0, 1.0])  # bounds included


# -- shared properties ----------------------------------------------------------------------
@pytest.mark.parametrize("family", QUANTIZER_NAMES)
@pytest.mark.parametrize("bits", [2, 4])
def test_export_grid_reproduces_forward(family: str, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * 0.2
    qw = build_quantizer(family, "weight", bits, True)
    qw.init_from(TensorStats.of(w))
    g = qw.export(w)
    scale = g["scale"].reshape(-1, 1, 1, 1)
    close(qw(w), scale * (g["int"].float() - g["zero_point"]), tol=1e-5)
    assert g["int"].abs().max() <= 2 ** (g["storage_bits"] - 1)
    a = torch.relu(torch.randn(4, 6, 5, 5))
    qa = build_quantizer(family, "act", bits, False).eval()
    qa.init_from(TensorStats.of(a))
    e = qa.export()
    ints = torch.clamp(torch.round(a / e["scale"]) + e["zero_point"], e["qmin"], e["qmax"])
    close(qa(a), (ints - e["zero_point"]) * e["scale"], tol=1e-5)


def test_attach_keeps_state_dict_and_switches_only_at_target_bits() -> None:
    torch.manual_seed(0)
    model = build_backbone("resnet18", "cifar", 0.0625)
    ref_keys = list(model.state_dict())
    ctx = bind_context(model)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with ctx.recording():
        model(x)
    with ctx.quantized("4w4a"):
        psq_out = model(x)
    qdict = attach(model, "pact", "4w4a")
    assert list(model.state_dict()) == ref_keys
    init_quantizers(model, [x])
    with ctx.quantized("4w4a"):
        out = model(x)
    assert not torch.allclose(out, psq_out)
    out.sum().backward()
    alphas = quantizer_parameters(qdict)
    assert alphas and any(p.grad is not None and p.grad.abs().sum() > 0 for p in alphas)
    stem = qdict["conv1-w"]
    assert stem.bits == 8 and qdict["layer1-0-conv1-w"].bits == 4


def test_attach_other_bits_equal_psq() -> None:
    torch.manual_seed(1)
    plain = build_backbone("resnet18", "cifar", 0.0625).eval()
    model = build_backbone("resnet18", "cifar", 0.0625).eval()
    model.load_state_dict(plain.state_dict())
    attach(model, "lsq", "4w4a")
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for m in (plain, model):
        ctx = bind_context(m)
        with ctx.recording():
            m(x)
        with ctx.quantized("3w4a"):
            outs.append(m(x))
    close(outs[0], outs[1], tol=0)


def test_mobilenet_block_outputs_get_signed_grids() -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilenet_v2", "cifar", 0.25).eval()
    qdict = attach(model, "pact", "4w4a")
    signed = {k for k, q in qdict.items() if k.endswith("-a") and q.signed}
    assert signed and all(k.endswith("act_out-a") for k in signed)
    ctx = bind_context(model)
    x = torch.randn(2, 3, 16, 16)
    init_quantizers(model, [x])
    with ctx.quantized("4w4a"):
        out = model(x)
    assert torch.isfinite(out).all()
    block_out = next(q for k, q in qdict.items() if k in signed)
    assert block_out.export()["qmin"] == -7 and block_out.export()["qmax"] == 7
