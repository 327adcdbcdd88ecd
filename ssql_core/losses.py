"""Losses as pure functions of tensors (tested alone, shared by every method)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def neg_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, sg(z)), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=-1).mean()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """1/2 [D(p1, sg z2) + D(p2, sg z1)]."""
    return 0.5 * (neg_cosine(p1, z2) + neg_cosine(p2, z1))


def ssql_loss(p1: Tensor, p2: Tensor, p1q: Tensor, p2q: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """SPEC 4.5: 1/4 [D(p1, sg z2) + D(p2, sg z1) + D(p1q, sg z2) + D(p2q, sg z1)]; FP targets."""
    return 0.25 * (neg_cosine(p1, z2) + neg_cosine(p2, z1) + neg_cosine(p1q, z2) + neg_cosine(p2q, z1))


def byol_regression(p: Tensor, t: Tensor) -> Tensor:
    """BYOL's normalised MSE, 2 - 2 cos(p, sg t), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p, t.detach(), dim=-1)).mean()


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: the positive key ``k`` against the negatives in ``queue`` [K, d].

    ``q``, ``k`` and ``queue`` are expected L2-normalised; ``k`` and ``queue`` carry no gradient.
    """
    pos = (q * k.detach()).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long, device=q.device))


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its pair, the rest are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1).float()
    n = len(z1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """SQAKD: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean; teacher carries no gradient."""
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def representation_std(z: Tensor) -> Tensor:
    """Collapse monitor: std over the batch of the L2-normalised projection, mean over dims.

    About 1/sqrt(d) for a healthy representation, 0 for a collapsed one.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()
