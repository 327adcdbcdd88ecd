"""The shared machinery of every pretraining method.

A method owns a quantizable backbone and its heads, one :class:`QuantContext` over the online
encoder (backbone + projector), and the per-step bit sampler. Subclasses add only their heads
and ``training_step``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config's type only: config.validate() imports this package, not the reverse
    from ssql_core.config import PretrainConfig

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ssql_core.errors import ConfigError
from ssql_core.models import build_backbone
from ssql_core.qnn import QuantContext, bind_context
from ssql_core.sampler import BitSampler


@dataclass(frozen=True)
class OptionRange:
    """What one method option accepts: an integer or a (finite) number within bounds.

    ``low_open``: the lower bound itself is excluded (e.g. a momentum in (0, 1]). ``None`` is
    accepted for an option whose default is ``None`` ("derive it from the width", etc.).
    """

    kind: type  # int or float
    low: float
    high: float
    low_open: bool = False

    def describe(self) -> str:
        if self.kind is int:
            if self.low == 1:
                return f"a positive integer at most {int(self.high)}"
            return f"an integer between {int(self.low)} and {int(self.high)}"
        if self.low_open:
            return f"a number above {self.low:g} and at most {self.high:g}"
        return f"a number between {self.low:g} and {self.high:g}"

    def check(self, field: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"must be {self.describe()}, got {value!r}")
        if self.kind is int and not isinstance(value, int):
            raise ConfigError(field, f"must be an integer ({self.describe()}), got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(field, f"must be a finite number ({self.describe()}), got {value!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            raise ConfigError(field, f"must be {self.describe()}, got {value!r}")


#: width of a projector / predictor layer: a 16384 x 16384 Linear already holds 268M weights
DIM = OptionRange(int, 1, 16384)
#: an EMA / momentum-encoder coefficient: 1 keeps the target fixed, 0 is excluded (no averaging)
MOMENTUM = OptionRange(float, 0.0, 1.0, low_open=True)
#: a softmax temperature of a contrastive loss
TEMPERATURE = OptionRange(float, 1e-3, 10.0)


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
    #: the accepted range of each option (an option without one: any positive finite number)
    option_ranges: ClassVar[dict[str, OptionRange]] = {}

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.options = {**self.default_options, **cfg.method_options}
        self.backbone = build_backbone(cfg.backbone, cfg.resolved_stem(), cfg.width, cfg.init or "torchvision")
        self.sampler = BitSampler(cfg.seed, tuple(cfg.w_bits), tuple(cfg.a_bits))
        self.qctx = self.new_context()

    # -- helpers for subclasses ------------------------------------------------------------
    def dim(self, full: int, minimum: int = 32) -> int:
        """A head width scaled with the backbone's width multiplier."""
        return max(minimum, int(round(full * self.cfg.width)))

    def new_context(self) -> QuantContext:
        """A quant context with this run's quantizer behaviours (rounding, weight-scale gradient)."""
        return QuantContext(self.cfg.rounding, self.cfg.weight_scale_grad)

    def bind_online(self, *modules: nn.Module) -> None:
        """Make the backbone and the given heads one quantizable encoder."""
        self.qctx = bind_context(nn.ModuleList([self.backbone, *modules]), self.new_context())

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
        """Every option known, of its type (integer or finite number, never a bool) and within its
        range (``option_ranges``), then :meth:`check_option_combination` on the merged options."""
        for k, v in options.items():
            field = f"method_options.{k}"
            if k not in cls.default_options:
                raise ConfigError(field, f"unknown option for {cls.name!r}; accepted: {sorted(cls.default_options)}")
            if v is None and cls.default_options[k] is None:
                continue
            spec = cls.option_ranges.get(k)
            if spec is not None:
                spec.check(field, v)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(field, f"must be a number, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(field, f"must be a finite number, got {v!r}")
            if v <= 0:
                raise ConfigError(field, f"must be positive, got {v!r}")
        cls.check_option_combination({**cls.default_options, **options})

    @classmethod
    def check_option_combination(cls, options: dict[str, Any]) -> None:
        """Constraints between options (each one already in range); ``options`` has the defaults
        filled in. None by default."""

    def training_step(self, x1: Tensor, x2: Tensor, step: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:  # noqa: B027
        """Momentum-encoder updates and the like."""
