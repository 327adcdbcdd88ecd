"""MoCo v2 and SSQL-MoCo: FP and quantized queries against the same FP momentum keys and queue.

Symmetrised (each view is query once); no shuffle-BN (single device); see docs/decisions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ssql_core.errors import ConfigError
from ssql_core.losses import info_nce
from ssql_core.methods.base import DIM, MOMENTUM, TEMPERATURE, Method, OptionRange, StepOutput
from ssql_core.models import MLPSpec


class MoCoV2(Method):
    name = "mocov2"
    default_options = {"proj_hidden": None, "proj_dim": 128, "queue_size": 4096, "temperature": 0.2, "key_momentum": 0.999}
    option_ranges = {"proj_hidden": DIM, "proj_dim": DIM, "queue_size": OptionRange(int, 1, 2**20),
                     "temperature": TEMPERATURE, "key_momentum": MOMENTUM}
    #: the queue holds queue_size x proj_dim floats: at most 2**27 (512 MiB in fp32)
    max_queue_elements = 2**27

    @classmethod
    def check_option_combination(cls, options: dict) -> None:
        elements = int(options["queue_size"]) * int(options["proj_dim"])
        if elements > cls.max_queue_elements:
            raise ConfigError("method_options.queue_size", f"queue_size x proj_dim must be at most {cls.max_queue_elements} "
                              f"(the key queue's size), got {options['queue_size']} x {options['proj_dim']} = {elements}")

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        h = int(self.options["proj_hidden"] or self.dim(2048))
        d = int(self.options["proj_dim"])
        self.projector = MLPSpec((self.backbone.feat_dim, h, d), hidden_bn=False, quantized=True).build()
        self.bind_online(self.projector)
        self.key_backbone = self.momentum_copy(self.backbone)
        self.key_projector = self.momentum_copy(self.projector)
        k = int(self.options["queue_size"])
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("queue", F.normalize(torch.randn(k, d, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    def _loss(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
        t = float(self.options["temperature"])
        return 0.5 * (info_nce(q1, k2, self.queue, t) + info_nce(q2, k1, self.queue, t))

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        k1, k2 = self._key(x1), self._key(x2)
        with self.fp_context():
            q1, q2 = self._query(x1), self._query(x2)
        loss = self._loss(q1, q2, k1, k2)
        metrics: dict[str, float] = {}
        if self.quantized:
            bits = self.sampler.sample(step)
            with self.qctx.quantized(bits, reuse_weights=True):
                q1q, q2q = self._query(x1), self._query(x2)
            loss = 0.5 * (self._loss(q1q, q2q, k1, k2) + loss)
            metrics = {"w_bits": float(bits.w), "a_bits": float(bits.a)}
        self._pending_keys = torch.cat([k1, k2]).float()
        return StepOutput(loss, q1, metrics)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = float(self.options["key_momentum"])
        self.ema_update(self.key_backbone, self.backbone, m)
        self.ema_update(self.key_projector, self.projector, m)
        keys = self._pending_keys
        k = len(self.queue)
        keys = keys[-k:]  # a queue shorter than the batch's keys keeps the newest ones
        ptr = int(self.queue_ptr)
        idx = (torch.arange(len(keys), device=keys.device) + ptr) % k
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % k)


class SSQLMoCo(MoCoV2):
    name = "ssql_moco"
    quantized = True
