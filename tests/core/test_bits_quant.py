"""The PSQ quantizer against hand-computed values and torch's fake-quant oracles (SPEC 2)."""

import pytest
import torch

from ssql_core.bits import BitWidth, parse_bits
from ssql_core.quant import (
    activation_qparams,
    quantize_activation,
    quantize_weight,
    weight_scale,
    weight_to_int,
)


@pytest.mark.parametrize("s,expected", [("4w4a", BitWidth(4, 4)), ("2w8a", BitWidth(2, 8)), ("fp", BitWidth(None, None)),
                                        ("4w4f", BitWidth(4, 4)), (" FP ", BitWidth(None, None)), ("8w2a", BitWidth(8, 2))])
def test_parse_bits_accepts(s, expected):
    assert parse_bits(s) == expected
    assert str(parse_bits(s)) == ("fp" if expected.is_fp else f"{expected.w}w{expected.a}a")


@pytest.mark.parametrize("s", ["9w4a", "1w4a", "4w9a", "4w", "w4a4", "32", "", "4x4a", "fp16"])
def test_parse_bits_rejects_with_accepted_forms(s):
    with pytest.raises(ValueError, match="accepted"):
        parse_bits(s)


def test_weight_quant_hand_computed():
    # one channel, max |w| = 1.5, 2 bits: s = 1.5 / 1.5 = 1, integer range [-2, 1]
    w = torch.tensor([[1.5, -1.5, 0.4, 0.6, -0.5, 1.2]])
    out = quantize_weight(w, 2)
    # round-half-even: 1.5 -> 2 -> clamp 1; -1.5 -> -2; 0.4 -> 0; 0.6 -> 1; -0.5 -> -0; 1.2 -> 1
    assert out.tolist() == [[1.0, -2.0, 0.0, 1.0, 0.0, 1.0]]
    # 4 bits: s = 1.5 / 7.5 = 0.2
    out4 = quantize_weight(w, 4)
    assert torch.allclose(out4, torch.tensor([[1.4, -1.6, 0.4, 0.6, -0.4, 1.2]]), atol=1e-6)


def test_activation_quant_hand_computed():
    # range [-1, 2], 2 bits: s = 3 / 3 = 1, z = 1, levels -1, 0, 1, 2
    x = torch.tensor([-1.2, -0.4, 0.5, 1.5, 2.6, 0.49])
    out = quantize_activation(x, 2, -1.0, 2.0)
    assert out.tolist() == [-1.0, 0.0, 0.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_matches_fake_quantize_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(32, 4, 3, 3)
    scale = weight_scale(w, bits).reshape(-1)
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(32, dtype=torch.int32), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(quantize_weight(w, bits), ref)
    w_int, s = weight_to_int(w, bits)
    assert torch.equal(w_int.float() * s.reshape(-1, 1, 1, 1), ref)
    assert int(w_int.min()) >= -(2 ** (bits - 1)) and int(w_int.max()) <= 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_activation_matches_fake_quantize_per_tensor(bits):
    torch.manual_seed(bits)
    x = torch.randn(4, 8, 5, 5) * 3
    lo, hi = x.min() * 0.8, x.max() * 0.7
    s, z, _ = activation_qparams(bits, lo, hi)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), 0, 2**bits - 1)
    assert torch.equal(quantize_activation(x, bits, lo, hi), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_ste_gradient_matches_oracle_mask(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 9, requires_grad=True)
    quantize_weight(w, bits).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    scale = weight_scale(w2, bits).reshape(-1)
    torch.fake_quantize_per_channel_affine(w2, scale, torch.zeros(16, dtype=torch.int32), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).sum().backward()
    assert torch.equal(w.grad, w2.grad)
    # the negative extreme of each channel rounds exactly onto the lowest level: gradient 1 there
    neg_extreme = w.detach() == w.detach().min(dim=1, keepdim=True).values
    neg_is_max_abs = w.detach().min(dim=1).values.abs() >= w.detach().max(dim=1).values
    assert bool((w.grad[neg_extreme & neg_is_max_abs.unsqueeze(1)] == 1).all())


def test_activation_ste_boundaries_included():
    x = torch.tensor([-1.0, 2.0, 2.4, 2.6, -1.6, 0.3], requires_grad=True)
    quantize_activation(x, 2, -1.0, 2.0).sum().backward()
    # -1 and 2 sit exactly on the extreme levels (gradient 1); 2.4 rounds to 2 (inside); 2.6 -> 3
    # and -1.6 -> -2 round outside (gradient 0)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_scales_detached_and_dead_channel_guarded():
    w = torch.randn(3, 4)
    w[1] = 0.0
    w.requires_grad_(True)
    out = quantize_weight(w, 4)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(4))
    out.sum().backward()
    # STE only: no scale gradient leaks into the arg-max weight of a channel
    assert set(w.grad.unique().tolist()) <= {0.0, 1.0}
    # other channels are still quantized (the whole tensor is not skipped)
    assert not torch.equal(out[0], w[0].detach())


def test_degenerate_activation_range():
    x = torch.zeros(2, 3)
    out = quantize_activation(x, 4, torch.tensor(0.0), torch.tensor(0.0))
    assert torch.isfinite(out).all() and torch.equal(out, x)
