"""BRECQ's parts beyond AdaRound (Li et al., ICLR 2021): residual blocks as units, the
Fisher-weighted output loss, and learned activation step sizes.

* **Units**: every residual block (ResNet BasicBlock / Bottleneck, MobileNetV2 inverted residual)
  is reconstructed as one unit, all its weights' roundings learned together against the block's
  FP output; a weight outside any block (the stem, MobileNetV2's last 1x1 conv) is a unit alone.
* **Fisher weighting**: the loss on a unit's output is ``sum((g^2 / mean(g^2)) * (out_q - out_fp)^2)``
  where ``g`` is the gradient, at the unit's output, of the task loss of the network quantized up to
  and including the unit (FP after it), per image and element; the diagonal Fisher approximation of
  the paper. Our backbones have no classifier while they are quantized (the probe is trained after
  PTQ), so the task loss is the squared error of the pooled feature against the FP feature (the
  BRECQ code uses the KL of the logits). The reference code weights by ``|g| + 1``; we normalise
  ``g^2`` to mean 1 so the rounding regularizer keeps the balance it has against a plain MSE.
* **Activation steps** (``learn_act``): after every unit's rounding is fixed, a second pass learns
  the step of every activation point of each unit LSQ-style (straight-through round, gradient to
  the step; Adam lr 4e-5, cosine, as the BRECQ code), the zero point fixed from calibration. The
  learned step is stored as the range ``[-z*s, (2^b-1-z)*s]``, so the packed format is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual

from ssql_core.models import BasicBlock, Bottleneck
from ssql_core.quant import activation_qparams
from ssql_core.quantizers.dorefa import round_ste

BLOCK_TYPES: tuple[type[nn.Module], ...] = (BasicBlock, Bottleneck, InvertedResidual)



class LearnedStep(nn.Module):
    """An activation point's step size as a parameter (zero point fixed): its ``act_override``."""

    def __init__(self, lo: Tensor, hi: Tensor, bits: int) -> None:
        super().__init__()
        self.bits = int(bits)
        scale, zero, qmax = activation_qparams(bits, lo, hi)
        self.register_buffer("zero", zero.detach().clone())
        self.register_buffer("qmax", qmax.detach().clone())
        self.step = nn.Parameter(scale.detach().clone())

    def quantize(self, x: Tensor, bits: int | Tensor) -> Tensor:
        if int(bits) != self.bits:
            raise RuntimeError(f"activation step learned at {self.bits} bits used at {int(bits)}")
        q = torch.clamp(round_ste(x.float() / self.step) + self.zero, 0.0, self.qmax)
        return ((q - self.zero) * self.step).to(x.dtype)

    @torch.no_grad()
    def range(self) -> Tensor:
        """``[lo, hi]`` whose PSQ parameters are this step and zero point."""
        s = self.step.detach().float().abs().clamp_min(1e-8)
        return torch.stack([-self.zero * s, (self.qmax - self.zero) * s]).cpu()


def fisher_weights(grads: Tensor) -> Tensor:
    """Squared gradients normalised to mean 1 (all-zero gradients: uniform weights)."""
    g2 = grads.float().pow(2)
    mean = g2.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(g2)
    return g2 / mean
