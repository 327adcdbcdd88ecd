"""SimCLR and SSQL-NCE: L = 1/2 [NT-Xent(f1, f2) + NT-Xent(f1q, f2q)] (SPEC 4)."""

from __future__ import annotations

from torch import Tensor

from ssql_core.losses import nt_xent
from ssql_core.methods.base import DIM, TEMPERATURE, Method, StepOutput
from ssql_core.models import MLPSpec


class SimCLR(Method):
    name = "simclr"
    default_options = {"proj_hidden": None, "proj_dim": 128, "temperature": 0.5}
    option_ranges = {"proj_hidden": DIM, "proj_dim": DIM, "temperature": TEMPERATURE}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        h = int(self.options["proj_hidden"] or self.dim(2048))
        d = int(self.options["proj_dim"])
        self.projector = MLPSpec((self.backbone.feat_dim, h, d), quantized=True).build()
        self.bind_online(self.projector)

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        t = float(self.options["temperature"])
        with self.fp_context():
            f1, f2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        loss = nt_xent(f1, f2, t)
        if not self.quantized:
            return StepOutput(loss, f1)
        bits = self.sampler.sample(step)
        with self.qctx.quantized(bits, reuse_weights=True):
            f1q, f2q = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        loss = 0.5 * (loss + nt_xent(f1q, f2q, t))
        return StepOutput(loss, f1, {"w_bits": float(bits.w), "a_bits": float(bits.a)})


class SSQLNCE(SimCLR):
    name = "ssql_nce"
    quantized = True
