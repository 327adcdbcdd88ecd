"""SimSiam and SSQL (SimSiam flavour, the paper's main method; SPEC 4)."""

from __future__ import annotations

from torch import Tensor

from ssql_core.losses import simsiam_loss, ssql_loss
from ssql_core.methods.base import DIM, Method, StepOutput
from ssql_core.models import MLPSpec


class SimSiam(Method):
    name = "simsiam"
    default_options = {"proj_dim": None, "pred_hidden": None}
    option_ranges = {"proj_dim": DIM, "pred_hidden": DIM}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = int(self.options["proj_dim"] or self.dim(2048))
        h = int(self.options["pred_hidden"] or d)
        feat = self.backbone.feat_dim
        self.projector = MLPSpec((feat, d, d, d), last_bn=True, last_bn_affine=False, quantized=True).build()
        self.predictor = MLPSpec((d, h, d)).build()
        self.bind_online(self.projector)

    def encode(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        with self.fp_context():
            z1, z2 = self.encode(x1), self.encode(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if not self.quantized:
            return StepOutput(simsiam_loss(p1, p2, z1, z2), z1)
        bits = self.sampler.sample(step)
        with self.qctx.quantized(bits, reuse_weights=True):
            z1q, z2q = self.encode(x1), self.encode(x2)
        p1q, p2q = self.predictor(z1q), self.predictor(z2q)
        loss = ssql_loss(p1, p2, p1q, p2q, z1, z2)
        return StepOutput(loss, z1, {"w_bits": float(bits.w), "a_bits": float(bits.a)})


class SSQL(SimSiam):
    name = "ssql"
    quantized = True
