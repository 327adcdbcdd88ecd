"""Pretraining methods by name (SPEC 4): one short file per family on a shared base."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config's type only: config.validate() imports this package, not the reverse
    from ssql_core.config import PretrainConfig

from ssql_core.methods.base import Method, StepOutput
from ssql_core.methods.byol import BYOL, SSQLBYOL
from ssql_core.methods.moco import MoCoV2, SSQLMoCo
from ssql_core.methods.simclr import SSQLNCE, SimCLR
from ssql_core.methods.simsiam import SSQL, SimSiam

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (SimSiam, SSQL, BYOL, SSQLBYOL, MoCoV2, SSQLMoCo, SimCLR, SSQLNCE)
}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry (usable as a decorator)."""
    METHODS[cls.name] = cls
    return cls


def build_method(cfg: PretrainConfig) -> Method:
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "Method", "StepOutput", "build_method", "register"]
from ssql_core.methods import pact as _pact  # noqa: E402,F401  (registers simsiam_pact)
