"""SimSiam-PACT (SPEC 4 baselines): SimSiam trained with PACT quantization-aware training at one
fixed bit-width ``cfg.bits`` (one model per bit-width: the cost SSQL removes).

Every encoder pass is quantized: block convs with DoReFa weights at ``w`` bits and activation
points with PACT (learnable clip) at ``a`` bits, the stem at 8 bits, the projector's Linear layers
at 8 bits (PSQ, as SSQL's), the predictor FP. The PACT clip values live in ``self.pact`` (keys
``pact.*`` of the method's state), not in the backbone, whose ``state_dict`` keeps torchvision's
names; they start at the first batch's FP activation maxima. Evaluation (``ssql_core.evaluate``)
of such a checkpoint uses the learned PACT/DoReFa quantizers at ``cfg.bits`` and PSQ PTQ at any
other bit-width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config's type only: config.validate() imports this package, not the reverse
    from ssql_core.config import PretrainConfig

import torch
from torch import Tensor

from ssql_core.bits import parse_bits
from ssql_core.methods import register
from ssql_core.methods.base import StepOutput
from ssql_core.methods.simsiam import SimSiam
from ssql_core.quantizers.attach import attach, init_quantizers


@register
class SimSiamPACT(SimSiam):
    name = "simsiam_pact"
    needs_fixed_bits = True

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        self.bits = parse_bits(cfg.bits or "")
        self.pact = attach(self.backbone, "pact", self.bits)
        # persistent: a resumed or reloaded run must not re-initialise its learned clips
        self.register_buffer("pact_initialized", torch.tensor(False))

    def encode(self, x: Tensor) -> Tensor:
        with self.qctx.quantized(self.bits):
            return self.projector(self.backbone(x))

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        if not bool(self.pact_initialized):
            init_quantizers(self.backbone, [x1, x2], eval_mode=False)
            self.pact_initialized.fill_(True)
        out = super().training_step(x1, x2, step)
        alphas = [q.alpha.detach() for q in self.pact.values() if hasattr(q, "alpha")]
        out.metrics["pact_alpha_mean"] = float(torch.stack(alphas).mean()) if alphas else 0.0
        return out
