"""Losses as pure functions, the SSQL step against the SPEC formula, the bit sampler."""

import itertools

import torch
from torch.nn import functional as F

from ssql_core.config import PretrainConfig
from ssql_core.losses import info_nce, neg_cosine, nt_xent, ssql_loss
from ssql_core.methods import build_method
from ssql_core.qnn import Mode
from ssql_core.sampler import BitSampler


def test_sampler_reproducible_per_seed_and_step_and_covers_grid():
    s = BitSampler(seed=7)
    draws = [s.sample(i) for i in range(2000)]
    assert draws == [BitSampler(seed=7).sample(i) for i in range(2000)]
    assert draws[500] == BitSampler(7).sample(500)  # any step alone, no sequential state
    assert {(b.w, b.a) for b in draws} == set(itertools.product(range(2, 9), range(4, 9)))
    assert [BitSampler(8).sample(i) for i in range(50)] != draws[:50]
    narrow = BitSampler(0, (3, 3), (6, 7))
    assert {(b.w, b.a) for b in (narrow.sample(i) for i in range(200))} == {(3, 6), (3, 7)}


def test_neg_cosine_stops_gradient_into_target():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    neg_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None
    assert torch.isclose(neg_cosine(z.detach(), z.detach()), torch.tensor(-1.0))


def test_nt_xent_matches_naive():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(5, 6), torch.randn(5, 6), 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    losses = []
    for i in range(10):
        j = (i + 5) % 10
        sims = torch.stack([z[i] @ z[k] / t for k in range(10) if k != i])
        pos = z[i] @ z[j] / t
        losses.append(-(pos - torch.logsumexp(sims, 0)))
    torch.testing.assert_close(nt_xent(z1, z2, t), torch.stack(losses).mean())


def test_info_nce_matches_naive():
    torch.manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 8), dim=1) for n in (3, 3, 6))
    naive = torch.stack([-(q[i] @ k[i] / 0.2 - torch.logsumexp(torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / 0.2, 0)) for i in range(3)])
    torch.testing.assert_close(info_nce(q, k, queue, 0.2), naive.mean())


def test_ssql_step_equals_spec_formula():
    """SPEC 4: FP pass records ranges, quantized pass at the step's draw, loss = 1/4 sum of 4 D's."""
    cfg = PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, seed=3).validate()
    torch.manual_seed(0)
    m = build_method(cfg)
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    step = 11
    # run the step twice from the same state (BN running stats differ only; train-mode BN uses
    # batch statistics, so the outputs are the same)
    out = m.training_step(x1, x2, step)
    bits = BitSampler(3).sample(step)
    assert out.metrics == {"w_bits": float(bits.w), "a_bits": float(bits.a)}
    enc = lambda x: m.projector(m.backbone(x))  # noqa: E731
    with m.qctx.recording():
        z1, z2 = enc(x1), enc(x2)
    with m.qctx.quantized(bits):
        z1q, z2q = enc(x1), enc(x2)
    p1, p2, p1q, p2q = (m.predictor(z) for z in (z1, z2, z1q, z2q))
    d = lambda p, z: -F.cosine_similarity(p, z.detach(), dim=-1).mean()  # noqa: E731
    expected = (d(p1, z2) + d(p2, z1) + d(p1q, z2) + d(p2q, z1)) / 4
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(ssql_loss(p1, p2, p1q, p2q, z1, z2), expected)
    assert m.qctx.mode is Mode.FP  # the step leaves the model in FP mode
    assert not torch.allclose(z1, z1q)


def test_plain_simsiam_never_quantizes():
    cfg = PretrainConfig(method="simsiam", dataset="synthetic", width=0.0625, image_size=16).validate()
    m = build_method(cfg)
    seen = []
    orig = m.qctx.quantized
    m.qctx.quantized = lambda b, **kw: seen.append(b) or orig(b, **kw)  # type: ignore[method-assign]
    m.training_step(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), 0)
    assert seen == []
