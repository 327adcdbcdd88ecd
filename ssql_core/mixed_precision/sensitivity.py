"""How much each layer minds being quantized: the costs the bit allocation minimises (decision 020).

Two measures, each giving a cost ``c[layer][bits]`` for every candidate bit-width:

* ``"hessian"`` (HAWQ-v2/v3): the average Hessian trace ``tr(H_l) / n_l`` of a loss with respect
  to layer ``l``'s weights, estimated with Hutchinson's method (``E[v^T H v] = tr(H)`` for
  Rademacher ``v``), times the perturbation ``||Q_b(W_l) - W_l||^2`` of PSQ's per-channel
  quantizer at ``b`` bits (a second-order estimate of the loss increase). The loss is the
  cross-entropy of an FP linear probe on the backbone's features over labelled images (the
  evaluation's probe); the model is in eval mode (BN running statistics), FP everywhere. One
  Hessian-vector product per sample and batch serves every layer at once: the cross-layer terms
  ``v_l^T H_lm v_m`` average to zero because the layers' ``v`` are independent.
  A negative estimate (noise, or negative curvature: this Hessian is not positive definite) is
  kept in the report and counted as 0 in the cost.
* ``"quant_error"``: quantize layer ``l`` alone at ``b`` bits (others FP, activations FP) and take
  the mean squared error of the pooled features against the FP model's on the images; needs no
  labels and no probe, costs ``layers x candidates`` forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ssql_core.bitconfig import configurable_layers
from ssql_core.qnn import Mode, QuantContext, weight_points
from ssql_core.quant import quantize_weight
from ssql_core.runtime import to_input

SENSITIVITIES = ("hessian", "quant_error")


def _batches(images: Iterable[Any], device: torch.device, labels: bool) -> list[tuple[Tensor, Tensor | None]]:
    out = []
    for b in images:
        x, y = (b, None) if isinstance(b, Tensor) else (b[0], b[1] if len(b) > 1 else None)
        if labels and y is None:
            raise ValueError("the Hessian sensitivity needs labelled images (x, y)")
        out.append((to_input(x, device, False), None if y is None else torch.as_tensor(y, device=device)))
    if not out:
        raise ValueError("sensitivity needs at least one image")
    return out


def hutchinson_traces(backbone: nn.Module, head: nn.Module, images: Iterable[Any], device: torch.device, samples: int = 16,
                      seed: int = 0, layers: Sequence[str] | None = None, ctx: QuantContext | None = None,
                      on_sample: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Per layer, Hutchinson's estimate of ``tr(H_l) / n_l`` of ``CE(head(backbone(x)), y)``
    averaged over ``images`` (batches ``(x, y)``); ``samples`` Rademacher vectors per batch."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    points = weight_points(backbone)
    names = list(layers) if layers is not None else configurable_layers(backbone)
    params = [points[n].weight for n in names]
    batches = _batches(images, device, labels=True)
    total = sum(len(x) for x, _ in batches)
    was = [p.requires_grad for p in backbone.parameters()]
    for p in backbone.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    traces = torch.zeros(len(names), dtype=torch.float64)
    backbone.eval()
    head.eval()
    mode = ctx.mode_as(Mode.FP) if ctx is not None else contextlib.nullcontext()
    try:
        with torch.enable_grad(), mode:
            for bi, (x, y) in enumerate(batches):
                loss = F.cross_entropy(head(backbone(x).float()), y, reduction="sum") / total  # type: ignore[arg-type]
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for s in range(samples):
                    vs = [(torch.randint(0, 2, p.shape, generator=g, dtype=torch.float32) * 2 - 1).to(p.device) for p in params]
                    gv = sum((gr.float() * v).sum() for gr, v in zip(grads, vs, strict=True))
                    hv = torch.autograd.grad(gv, params, retain_graph=True)  # type: ignore[arg-type]
                    for i, (h, v) in enumerate(zip(hv, vs, strict=True)):
                        traces[i] += float((h.float() * v).sum())
                    if on_sample is not None:
                        on_sample(bi * samples + s + 1, len(batches) * samples)
                del grads, loss
    finally:
        for p, w in zip(backbone.parameters(), was, strict=True):
            p.requires_grad_(w)
    traces /= samples
    return {n: float(traces[i]) / points[n].weight.numel() for i, n in enumerate(names)}


def perturbation(w: Tensor, bits: int, rounding: str = "reciprocal") -> float:
    """``||Q_b(w) - w||^2`` with PSQ's per-channel weight quantizer (nearest rounding)."""
    w = w.detach().float()
    return float((quantize_weight(w, bits, rounding=rounding) - w).pow(2).sum())


def hessian_costs(traces: dict[str, float], backbone: nn.Module, candidates: Sequence[int],
                  rounding: str = "reciprocal") -> dict[str, list[float]]:
    """HAWQ's cost ``max(tr/n, 0) * ||Q_b(W) - W||^2`` per layer and candidate."""
    points = weight_points(backbone)
    return {n: [max(t, 0.0) * perturbation(points[n].weight, b, rounding) for b in candidates] for n, t in traces.items()}


@torch.no_grad()
def quant_error_costs(backbone: nn.Module, images: Iterable[Any], device: torch.device, candidates: Sequence[int],
                      layers: Sequence[str] | None = None, ctx: QuantContext | None = None, rounding: str = "reciprocal",
                      on_layer: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Per layer and candidate: the features' MSE against FP with that layer alone quantized."""
    points = weight_points(backbone)
    names = list(layers) if layers is not None else configurable_layers(backbone)
    batches = [x for x, _ in _batches(images, device, labels=False)]
    backbone.eval()
    mode = ctx.mode_as(Mode.FP) if ctx is not None else contextlib.nullcontext()
    with mode:
        ref = [backbone(x).float() for x in batches]
        out: dict[str, list[float]] = {}
        for li, n in enumerate(names):
            w = points[n].weight
            keep = w.detach().clone()
            costs = []
            try:
                for b in candidates:
                    w.copy_(quantize_weight(keep, b, rounding=rounding))
                    err = sum(float((backbone(x).float() - r).pow(2).sum()) for x, r in zip(batches, ref, strict=True))
                    costs.append(err / sum(r.numel() for r in ref))
            finally:
                w.copy_(keep)
            out[n] = costs
            if on_layer is not None:
                on_layer(li + 1, len(names))
    return out
