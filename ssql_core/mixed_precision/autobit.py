"""Autobit: per-layer weight bits for a budget, from each layer's sensitivity (decision 020).

``EvalConfig.autobit`` = ``{"budget_bits": 4.0}`` (or ``"budget_bytes"``; optionally
``"budget_bops"`` as well) makes an evaluation measure every layer's sensitivity
(:mod:`ssql_core.mixed_precision.sensitivity`), choose a weight bit-width per layer out of ``candidates``
(:mod:`ssql_core.mixed_precision.allocation`) with the activations at ``a_bits``, and evaluate the chosen
configuration as one more result row, named by its label (``mixed-...``) and carrying the map.

Budgets:

* ``budget_bits``: the average weight bits of the configurable layers (every weight layer but
  the 8-bit stem), weighted by their parameters; uniform ``4w4a`` has 4.0;
* ``budget_bytes``: the packed file's tensors (``bitconfig.footprint``'s ``model_bytes``: the
  weights at their bits, BN, scales, ranges; the stem at 8 bits);
* ``budget_bops``: bit operations per image (MACs x weight bits x input activation bits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ssql_core.bitconfig import FP_BITS, BitConfig, LayerTable
from ssql_core.bits import MAX_BITS, MIN_BITS, BitWidth
from ssql_core.errors import ConfigError
from ssql_core.mixed_precision.allocation import (
    SOLVERS,
    Allocation,
    InfeasibleBudget,
    Problem,
    Resource,
    solve,
)
from ssql_core.mixed_precision.sensitivity import SENSITIVITIES

DEFAULT_CANDIDATES = (2, 3, 4, 6, 8)
MAX_IMAGES = 8192
MAX_SAMPLES = 1024
BUDGETS = ("budget_bits", "budget_bytes", "budget_bops")


@dataclass
class AutobitConfig:
    """What ``EvalConfig.autobit`` holds (see the module docstring)."""

    budget_bits: float | None = None
    budget_bytes: int | None = None
    budget_bops: int | None = None
    #: "hessian" (HAWQ: Hutchinson trace of the probe's cross-entropy x perturbation) or
    #: "quant_error" (features' MSE with one layer quantized)
    sensitivity: str = "hessian"
    #: "milp" (exact, scipy.optimize.milp) or "greedy"
    solver: str = "milp"
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    #: the activation bits of every configurable layer (the stem stays at 8)
    a_bits: int = 8
    #: sensitivity images: a seeded subset of the training split, test transform
    images: int = 256
    #: Hutchinson's Rademacher vectors per batch of images (hessian only)
    samples: int = 16

    @classmethod
    def from_dict(cls, d: Any) -> AutobitConfig:
        if not isinstance(d, dict):
            raise ConfigError("autobit", f"must be an object such as {{'budget_bits': 4.0}}, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"autobit.{unknown[0]}", f"unknown option; accepted: {names}")
        d = dict(d)
        if isinstance(d.get("candidates"), list):
            d["candidates"] = tuple(d["candidates"])
        return cls(**d)

    def validate(self) -> AutobitConfig:
        if self.budget_bits is None and self.budget_bytes is None:
            raise ConfigError("autobit.budget_bits", "give a budget: budget_bits (average weight bits, e.g. 4.0) or "
                              "budget_bytes (model size); budget_bops may be added to either")
        if self.budget_bits is not None and self.budget_bytes is not None:
            raise ConfigError("autobit.budget_bytes", "give budget_bits or budget_bytes, not both")
        if self.budget_bits is not None:
            v = self.budget_bits
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 32:
                raise ConfigError("autobit.budget_bits", f"must be a number of bits per weight (e.g. 4.0), got {v!r}")
        for name in ("budget_bytes", "budget_bops"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**18):
                raise ConfigError(f"autobit.{name}", f"must be a positive integer, got {v!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError("autobit.sensitivity", f"must be one of {list(SENSITIVITIES)}, got {self.sensitivity!r}")
        if self.solver not in SOLVERS:
            raise ConfigError("autobit.solver", f"must be one of {list(SOLVERS)}, got {self.solver!r}")
        c = self.candidates
        if (not isinstance(c, (list, tuple)) or not c or len(c) > MAX_BITS - MIN_BITS + 1
                or not all(isinstance(b, int) and not isinstance(b, bool) and MIN_BITS <= b <= MAX_BITS for b in c)
                or len(set(c)) != len(c)):
            raise ConfigError("autobit.candidates", f"must be distinct integers from {MIN_BITS} to {MAX_BITS}, e.g. [2, 3, 4, 6, 8]; got {c!r}")
        self.candidates = tuple(sorted(c))
        for name, lo, hi in (("a_bits", MIN_BITS, MAX_BITS), ("images", 1, MAX_IMAGES), ("samples", 1, MAX_SAMPLES)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"autobit.{name}", f"must be an integer between {lo} and {hi}, got {v!r}")
        if self.budget_bits is not None and self.budget_bits < self.candidates[0]:
            raise ConfigError("autobit.budget_bits", f"no configuration meets {self.budget_bits:g} average weight bits: the smallest "
                              f"achievable is {self.candidates[0]} (every layer at {self.candidates[0]} bits)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["candidates"] = list(self.candidates)
        return d

    def budgets(self) -> dict[str, float]:
        return {b: getattr(self, b) for b in BUDGETS if getattr(self, b) is not None}


def problem(table: LayerTable, cfg: AutobitConfig, costs: dict[str, list[float]] | None = None) -> Problem:
    """The allocation problem of ``table`` under ``cfg``'s budgets (zero costs when ``costs`` is
    None: enough to check that the budgets can be met)."""
    layers = table.configurable
    names = [la.name for la in layers]
    cand = np.asarray(cfg.candidates, dtype=np.int64)
    params = np.asarray([la.params for la in layers], dtype=np.int64)
    cost = np.zeros((len(layers), len(cand))) if costs is None else np.asarray([costs[n] for n in names], dtype=np.float64)
    size = params[:, None] * cand[None, :]
    resources = []
    if cfg.budget_bits is not None:
        n = int(params.sum())
        resources.append(Resource("budget_bits", size, int(math.floor(cfg.budget_bits * n + 1e-6)),
                                  lambda total, n=n: round(total / n, 4)))
    if cfg.budget_bytes is not None:
        fixed_bits = sum(la.params * 8 for la in table.layers if not la.configurable)  # the stem
        budget = 8 * (cfg.budget_bytes - table.fixed_bytes) - fixed_bits
        resources.append(Resource("budget_bytes", size, budget,
                                  lambda total, fb=fixed_bits: table.fixed_bytes + (total + fb + 7) // 8))
    if cfg.budget_bops is not None:
        a_in = np.asarray([_input_bits(table, la.input_point, cfg.a_bits) for la in layers], dtype=np.int64)
        macs = np.asarray([la.macs for la in layers], dtype=np.int64)
        fixed_bops = sum(la.macs * 8 * _input_bits(table, la.input_point, cfg.a_bits) for la in table.layers if not la.configurable)
        resources.append(Resource("budget_bops", (macs * a_in)[:, None] * cand[None, :], cfg.budget_bops - fixed_bops,
                                  lambda total, fb=fixed_bops: total + fb))
    return Problem(names, list(cfg.candidates), cost, resources)


def _input_bits(table: LayerTable, point: str | None, a_bits: int) -> int:
    if point is None:
        return FP_BITS
    return 8 if table.act_points.get(point) == "fixed8" else a_bits


def check_budget(table: LayerTable, cfg: AutobitConfig) -> None:
    """``ConfigError`` naming the budget when no configuration of ``table`` meets it, with the
    smallest value one reaches."""
    try:
        problem(table, cfg).check()
    except InfeasibleBudget as e:
        raise ConfigError(f"autobit.{e.resource}", str(e)) from None


def allocate(table: LayerTable, cfg: AutobitConfig, costs: dict[str, list[float]],
             solver: str | None = None) -> tuple[BitConfig, Allocation]:
    """The per-layer configuration minimising the summed cost within the budgets."""
    p = problem(table, cfg, costs)
    try:
        alloc = solve(p, solver or cfg.solver)
    except InfeasibleBudget as e:
        raise ConfigError(f"autobit.{e.resource}", str(e)) from None
    config = BitConfig(tuple(sorted((n, BitWidth(b, cfg.a_bits)) for n, b in alloc.bits.items())))
    return config, alloc


def costs_for(cfg: AutobitConfig, backbone: nn.Module, ctx: Any, images: Any, device: Any, head: nn.Module | None,
              rounding: str, seed: int, progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each configurable layer's cost per candidate under ``cfg.sensitivity``, and what the row
    reports about it (per-layer traces for hessian)."""
    from ssql_core.mixed_precision.sensitivity import (
        hessian_costs,
        hutchinson_traces,
        quant_error_costs,
    )

    if cfg.sensitivity == "hessian":
        if head is None:
            raise ValueError("the hessian sensitivity needs the FP probe (head)")
        traces = hutchinson_traces(backbone, head, images, device, cfg.samples, seed, ctx=ctx, on_sample=progress)
        return hessian_costs(traces, backbone, cfg.candidates, rounding), {"trace_per_param": {n: float(f"{t:.6g}") for n, t in traces.items()},
                                                                           "negative_traces": sum(t < 0 for t in traces.values())}
    costs = quant_error_costs(backbone, images, device, cfg.candidates, ctx=ctx, rounding=rounding, on_layer=progress)
    return costs, {}
