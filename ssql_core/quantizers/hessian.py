"""EWGS's delta from the loss curvature (Lee et al. 2021, section 3.3), per quantizer.

For each EWGS quantizer with rounded output ``q`` (level units), the paper sets
``delta = max(0, (Tr(H_q) / N) / (3 std(dL/dq)))``: the average Hessian diagonal w.r.t. the
quantized values, relative to the spread of their gradients. ``Tr(H_q)`` is estimated with
Hutchinson's estimator ``E[v^T H v]`` (Rademacher ``v``); one Hessian-vector product per sample
serves every layer at once (cross-layer terms vanish in expectation). Averaged over the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ssql_core.quantizers.ewgs import _EWGS


def update_ewgs_deltas(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], images: Sequence[Tensor],
                       samples: int = 2) -> dict[str, float]:
    """Set every EWGS quantizer's ``delta`` of ``model`` from ``loss_fn(model(x), x)`` on ``images``."""
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, _EWGS)}
    if not quantizers:
        return {}
    sums = dict.fromkeys(quantizers, 0.0)
    was_training = model.training
    model.train()
    try:
        for q in quantizers.values():
            q.capture = True
        for x in images:
            loss = loss_fn(model(x), x)
            qs = [quantizers[n].captured for n in quantizers]
            grads = torch.autograd.grad(loss, qs, create_graph=True)
            traces = dict.fromkeys(quantizers, 0.0)
            for s in range(samples):
                vs = [torch.randint_like(g, 2) * 2 - 1 for g in grads]
                hvs = torch.autograd.grad(grads, qs, grad_outputs=vs, retain_graph=s < samples - 1)
                for n, v, hv in zip(quantizers, vs, hvs, strict=True):
                    traces[n] += (v * hv).sum().item() / samples
            for n, g in zip(quantizers, grads, strict=True):
                sums[n] += (traces[n] / g.numel()) / (3.0 * g.detach().std().item() + 1e-12)
    finally:
        for q in quantizers.values():
            q.capture, q.captured = False, None
        model.train(was_training)
    deltas = {n: max(0.0, sums[n] / max(len(images), 1)) for n in quantizers}
    with torch.no_grad():
        for n, q in quantizers.items():
            q.delta.fill_(deltas[n])
    return deltas
