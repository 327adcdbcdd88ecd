"""The reference implementation's quantizer behaviours, as options: each one's effect shown."""

from __future__ import annotations

import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.methods import build_method
from ssql_core.models import build_backbone
from ssql_core.quant import quantize_activation, quantize_weight, weight_scale, weight_to_int


def test_attached_scale_adds_gradient_only_through_the_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    g_out = torch.randn_like(w)
    grads = {}
    for mode in ("detached", "attached"):
        x = w.clone().requires_grad_(True)
        quantize_weight(x, 2, scale_grad=mode).backward(g_out)
        grads[mode] = x.grad
    diff = (grads["attached"] - grads["detached"]).reshape(8, -1)
    # values are identical; gradients differ exactly at each channel's largest |w| (the scale's argmax)
    assert torch.equal(quantize_weight(w, 2, scale_grad="attached"), quantize_weight(w, 2))
    argmax = w.reshape(8, -1).abs().argmax(1)
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[torch.arange(8), argmax] = True
    assert diff[~mask].abs().max() < 1e-6  # (x * (1/s)) * s is 1 up to float rounding
    assert (diff[mask].abs() > 1e-4).all()
    # d out / d s summed over the channel, carried to the argmax through s = max|w| / 1.5
    s = weight_scale(w, 2)
    v = w * (1.0 / s)  # the default rounding's spelling: the argmax sits on a .5 tie
    q = torch.round(v).clamp(-2, 1)
    ds = torch.where((torch.round(v) >= -2) & (torch.round(v) <= 1), q - v, q)
    expected = (g_out * ds).reshape(8, -1).sum(1) / 1.5 * torch.sign(w.reshape(8, -1)[torch.arange(8), argmax])
    torch.testing.assert_close(diff[mask], expected, rtol=1e-4, atol=1e-5)


def test_divide_rounding_is_x_over_s_and_differs_at_ties() -> None:
    torch.manual_seed(1)
    w = torch.randn(512, 64)
    s = weight_scale(w, 4)
    div = quantize_weight(w, 4, rounding="divide")
    rec = quantize_weight(w, 4)
    torch.testing.assert_close(div, torch.round(w / s).clamp(-8, 7) * s, rtol=0, atol=0)
    torch.testing.assert_close(rec, torch.round(w * (1.0 / s)).clamp(-8, 7) * s, rtol=0, atol=0)
    changed = (div != rec).any(1).float().mean().item()
    assert 0.0 < changed < 0.5  # only channels whose tie rounds the other way
    ints_div, _ = weight_to_int(w, 4, rounding="divide")
    torch.testing.assert_close(ints_div.float() * s, div, rtol=0, atol=0)
    x = torch.rand(10000) * 3
    torch.testing.assert_close(quantize_activation(x, 4, 0.0, 3.0, rounding="divide"),
                               torch.round(x / (3.0 / 15)).clamp(0, 15) * (3.0 / 15))


def test_pytorch_init_matches_the_reference_statistics() -> None:
    torch.manual_seed(0)
    tv = build_backbone("resnet18", "cifar", 1.0, "torchvision").layer1[0].conv1.weight
    pt = build_backbone("resnet18", "cifar", 1.0, "pytorch").layer1[0].conv1.weight
    assert abs(tv.std().item() - (2 / (64 * 9)) ** 0.5) < 0.003  # kaiming-normal fan_out: 0.059
    assert abs(pt.std().item() - 1 / (3 * 64 * 9) ** 0.5) < 0.002  # kaiming-uniform a=sqrt(5): 0.024


def test_preset_sets_all_three_and_explicit_fields_win() -> None:
    ours = PretrainConfig().validate()
    assert (ours.weight_scale_grad, ours.rounding, ours.init) == ("detached", "reciprocal", "torchvision")
    ref = PretrainConfig(preset="reference").validate()
    assert (ref.weight_scale_grad, ref.rounding, ref.init) == ("attached", "divide", "pytorch")
    mixed = PretrainConfig(preset="reference", rounding="reciprocal").validate()
    assert (mixed.weight_scale_grad, mixed.rounding) == ("attached", "reciprocal")
    d = ref.to_dict()
    assert d["preset"] == "reference" and d["rounding"] == "divide"
    assert PretrainConfig.from_dict(d).validate().to_dict() == d
    for field, bad in (("preset", "paper"), ("rounding", "floor"), ("weight_scale_grad", "yes"), ("init", "xavier")):
        with pytest.raises(ConfigError) as e:
            PretrainConfig(**{field: bad}).validate()
        assert e.value.field == field


def test_reference_preset_reaches_the_method_and_trains() -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=8, preset="reference").validate()
    m = build_method(cfg)
    assert (m.qctx.rounding, m.qctx.weight_scale_grad) == ("divide", "attached")
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    out = m.training_step(x1, x2, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
