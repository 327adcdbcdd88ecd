"""The shared machinery of every pretraining method.

A method owns a quantizable backbone and its heads, one :class:`QuantContext` over the online
encoder (backbone + projector), and the per-step bit sampler. Subclasses add only their heads
and ``training_step``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssql_core.config import PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.models import build_backbone
from ssql_core.qnn import QuantContext, bind_context
from ssql_core.sampler import BitSampler


@dataclass
class StepOutput:
    loss: Tensor
    #: projection of view 1 for the collapse monitor
    z: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    #: True for the SSQL variants: every step adds a quantized pass at a random bit-width
    quantized: ClassVar[bool] = False
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.options = {**self.default_options, **cfg.method_options}
        self.backbone = build_backbone(cfg.backbone, cfg.resolved_stem(), cfg.width)
        self.sampler = BitSampler(cfg.seed, tuple(cfg.w_bits), tuple(cfg.a_bits))
        self.qctx = QuantContext()

    # -- helpers for subclasses ------------------------------------------------------------
    def dim(self, full: int, minimum: int = 32) -> int:
        """A head width scaled with the backbone's width multiplier."""
        return max(minimum, int(round(full * self.cfg.width)))

    def bind_online(self, *modules: nn.Module) -> None:
        """Make the backbone and the given heads one quantizable encoder."""
        self.qctx = bind_context(nn.ModuleList([self.backbone, *modules]), QuantContext())

    @staticmethod
    def momentum_copy(module: nn.Module) -> nn.Module:
        """A frozen FP copy (EMA target / key encoder) with a private, always-FP context."""
        target = copy.deepcopy(module)
        bind_context(target, QuantContext())
        for p in target.parameters():
            p.requires_grad_(False)
        return target

    @staticmethod
    @torch.no_grad()
    def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
        for t, o in zip(target.parameters(), online.parameters(), strict=True):
            t.mul_(m).add_(o.detach(), alpha=1 - m)
        for t, o in zip(target.buffers(), online.buffers(), strict=True):
            if t.dtype.is_floating_point and t.shape == o.shape:
                t.copy_(o)

    def fp_context(self) -> Any:
        """FP forward; SSQL variants record the activation ranges of both views in it."""
        return self.qctx.recording() if self.quantized else contextlib.nullcontext()

    # -- API ---------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        for k, v in options.items():
            if k not in cls.default_options:
                raise ConfigError(f"method_options.{k}", f"unknown option for {cls.name!r}; accepted: {sorted(cls.default_options)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"method_options.{k}", f"must be a number, got {v!r}")
            if v <= 0:
                raise ConfigError(f"method_options.{k}", f"must be positive, got {v!r}")

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:  # noqa: B027
        """Momentum-encoder updates and the like."""
