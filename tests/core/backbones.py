"""Fixed small backbones for the quantization tests: random weights, but BN statistics that are
not the identity, so that folding, calibration and export are exercised on non-trivial values."""

from __future__ import annotations

import torch
from torch import nn

from ssql_core.models import build_backbone


def random_backbone(name: str = "resnet18", seed: int = 0, width: float | None = None, stem: str = "cifar") -> nn.Module:
    """A random-init ``name`` (width 1/16, 1/4 for MobileNetV2) in eval mode with perturbed BN."""
    torch.manual_seed(seed)
    w = width if width is not None else (0.25 if name == "mobilenet_v2" else 0.0625)
    bb = build_backbone(name, stem, w).eval()
    for m in bb.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return bb


def frozen_backbone(name: str = "resnet18", seed: int = 0) -> nn.Module:
    """:func:`random_backbone` with every parameter frozen (PTQ and sensitivity tests)."""
    bb = random_backbone(name, seed)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb
