"""BYOL and SSQL-BYOL: targets from an FP EMA encoder (m = 0.99), computed without gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ssql_core.losses import byol_regression
from ssql_core.methods.base import DIM, MOMENTUM, Method, StepOutput
from ssql_core.models import MLPSpec


class BYOL(Method):
    name = "byol"
    default_options = {"proj_hidden": None, "proj_dim": None, "ema": 0.99}
    option_ranges = {"proj_hidden": DIM, "proj_dim": DIM, "ema": MOMENTUM}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        h = int(self.options["proj_hidden"] or self.dim(2048))
        d = int(self.options["proj_dim"] or self.dim(256))
        self.projector = MLPSpec((self.backbone.feat_dim, h, d), quantized=True).build()
        self.predictor = MLPSpec((d, h, d)).build()
        self.bind_online(self.projector)
        self.target_backbone = self.momentum_copy(self.backbone)
        self.target_projector = self.momentum_copy(self.projector)

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        with self.fp_context():
            z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (byol_regression(p1, t2) + byol_regression(p2, t1))
        if not self.quantized:
            return StepOutput(loss, z1)
        bits = self.sampler.sample(step)
        with self.qctx.quantized(bits, reuse_weights=True):
            z1q, z2q = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1q, p2q = self.predictor(z1q), self.predictor(z2q)
        loss_q = 0.5 * (byol_regression(p1q, t2) + byol_regression(p2q, t1))
        return StepOutput(0.5 * (loss + loss_q), z1, {"w_bits": float(bits.w), "a_bits": float(bits.a)})

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = float(self.options["ema"])
        self.ema_update(self.target_backbone, self.backbone, m)
        self.ema_update(self.target_projector, self.projector, m)


class SSQLBYOL(BYOL):
    name = "ssql_byol"
    quantized = True
