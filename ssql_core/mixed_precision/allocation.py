"""Choosing bits per layer under a budget: an integer program and a greedy (docs/decisions/020).

The problem (HAWQ-v3's): layers ``l``, candidate weight bits ``b``, a cost ``c[l, b]`` (the
layer's sensitivity times its perturbation at ``b`` bits, :mod:`ssql_core.mixed_precision.sensitivity`) and
resources ``r_k[l, b]`` (bits of weights, bit operations) with budgets ``B_k``::

    minimise  sum_l c[l, b_l]   subject to  sum_l r_k[l, b_l] <= B_k  for every k

Resources are integers (bits, BOPs), so a configuration meets a budget exactly or not at all.

* :func:`solve_milp`: the exact optimum with ``scipy.optimize.milp`` (HiGHS), one binary per
  (layer, bits), one "exactly one" row per layer, one row per resource; relative gap 0.
* :func:`solve_greedy`: the same interface; every layer starts at its largest candidate, then
  repeatedly steps down the layer whose next lower candidate adds the least cost per unit of
  (budget-normalised) resource saved, until every budget is met; then spends what is left on the
  steps up that buy the most cost reduction per unit. Not optimal (the tests show where).

A budget that no configuration meets raises :class:`InfeasibleBudget` (a ``ValueError``) naming
the resource and the smallest value any configuration reaches (every layer at its fewest bits).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SOLVERS = ("milp", "greedy")


class InfeasibleBudget(ValueError):
    """No configuration meets ``resource``'s budget; ``smallest`` is the least any reaches."""

    def __init__(self, resource: str, budget: float, smallest: float, detail: str = "") -> None:
        super().__init__(f"no configuration meets the {resource} budget {budget:g}: the smallest achievable is "
                         f"{smallest:g}{detail}")
        self.resource, self.budget, self.smallest = resource, budget, smallest


@dataclass
class Resource:
    """One budgeted quantity: ``use[l, j]`` for layer ``l`` at candidate ``j``, and its budget
    (both in the integer unit the solvers compare); ``to_user`` turns a total into the unit the
    user gave the budget in (average bits, bytes), for messages and reports."""

    name: str
    use: np.ndarray  # int64 [L, B]
    budget: int
    to_user: Callable[[int], float] = float


@dataclass
class Problem:
    layers: list[str]
    candidates: list[int]  # ascending
    cost: np.ndarray  # float64 [L, B]
    resources: list[Resource] = field(default_factory=list)

    def check(self) -> None:
        """Shapes, finiteness, and that every resource's budget is reachable at all."""
        shape = (len(self.layers), len(self.candidates))
        if self.cost.shape != shape or not np.isfinite(self.cost).all():
            raise ValueError(f"cost must be a finite [{shape[0]} layers, {shape[1]} candidates] array")
        if list(self.candidates) != sorted(set(self.candidates)):
            raise ValueError(f"candidates must be distinct and ascending, got {self.candidates}")
        for r in self.resources:
            if r.use.shape != shape:
                raise ValueError(f"resource {r.name}: use must be [{shape[0]}, {shape[1]}]")
            least = int(r.use.min(axis=1).sum())
            if least > r.budget:
                raise InfeasibleBudget(r.name, r.to_user(r.budget), r.to_user(least),
                                       f" (every layer at {self.candidates[0]} bits)")


@dataclass
class Allocation:
    """The chosen candidate per layer, its objective and resource use, and how it was found."""

    bits: dict[str, int]
    objective: float
    #: each resource's total, in the solvers' integer unit and in the budget's own (bits, bytes)
    used: dict[str, int]
    used_user: dict[str, float]
    solver: str
    seconds: float
    status: str = "optimal"

    def summary(self) -> dict[str, Any]:
        return {"solver": self.solver, "objective": self.objective, "used": dict(self.used_user), "status": self.status,
                "solve_seconds": round(self.seconds, 4)}


def _result(p: Problem, choice: Sequence[int], solver: str, t0: float, status: str) -> Allocation:
    idx = np.arange(len(p.layers))
    ch = np.asarray(choice, dtype=np.int64)
    used = {r.name: int(r.use[idx, ch].sum()) for r in p.resources}
    for r in p.resources:  # the guarantee both solvers give, checked in exact integers
        if used[r.name] > r.budget:
            raise RuntimeError(f"{solver}: the allocation uses {used[r.name]} of {r.name}, over its budget {r.budget}")
    return Allocation({n: p.candidates[j] for n, j in zip(p.layers, ch, strict=True)}, float(p.cost[idx, ch].sum()), used,
                      {r.name: r.to_user(used[r.name]) for r in p.resources}, solver, time.perf_counter() - t0, status)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS (scipy 1.17) prints a debug line to file descriptor 1 on some solves, even with
    ``disp=False``; it would land in the JSON a command prints. Descriptor 1 goes to /dev/null
    for the solve (milliseconds)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no descriptor 1 (embedded interpreters): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_milp(p: Problem, time_limit: float | None = None) -> Allocation:
    """The optimal allocation of ``p`` (``scipy.optimize.milp``, HiGHS, relative gap 0)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    p.check()
    t0 = time.perf_counter()
    n_l, n_b = p.cost.shape
    n = n_l * n_b
    # costs scaled so HiGHS' absolute gap (1e-6) is negligible against them
    span = float(np.abs(p.cost).max(axis=1).sum()) or 1.0
    c = p.cost.reshape(-1) * (1e6 / span)
    rows = np.repeat(np.arange(n_l), n_b)
    one = LinearConstraint(coo_matrix((np.ones(n), (rows, np.arange(n))), shape=(n_l, n)).tocsr(), 1, 1)
    constraints = [one]
    for r in p.resources:
        norm = float(np.abs(r.use).max()) or 1.0
        # integer use <= budget  <=>  use <= budget + 0.5: the half unit absorbs the solver's tolerance
        constraints.append(LinearConstraint(r.use.reshape(1, -1) / norm, -np.inf, (r.budget + 0.5) / norm))
    options: dict[str, Any] = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = time_limit
    with _quiet_stdout():
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints, options=options)
    if res.x is None:
        raise RuntimeError(f"milp found no allocation: {res.message}")
    choice = np.asarray(res.x).reshape(n_l, n_b).argmax(axis=1)
    return _result(p, choice, "milp", t0, "optimal" if res.status == 0 else f"stopped: {res.message}")


def solve_greedy(p: Problem) -> Allocation:
    """Step layers down from their largest candidate by least added cost per resource saved,
    until every budget is met; then step up while the budgets allow (see the module docstring)."""
    p.check()
    t0 = time.perf_counter()
    n_l, n_b = p.cost.shape
    choice = np.full(n_l, n_b - 1, dtype=np.int64)
    idx = np.arange(n_l)

    def totals() -> list[int]:
        return [int(r.use[idx, choice].sum()) for r in p.resources]

    while True:
        over = [(r, t - r.budget) for r, t in zip(p.resources, totals(), strict=True) if t > r.budget]
        if not over:
            break
        best, best_j, best_ratio = -1, -1, math.inf
        for layer in range(n_l):
            j = choice[layer]
            if j == 0:
                continue
            saved = sum((r.use[layer, j] - r.use[layer, j - 1]) / max(excess, 1) for r, excess in over)
            if saved <= 0:
                continue
            ratio = (p.cost[layer, j - 1] - p.cost[layer, j]) / saved
            if ratio < best_ratio:
                best, best_j, best_ratio = layer, j - 1, ratio
        if best < 0:  # unreachable after check(): every layer at its least use meets every budget
            raise RuntimeError("greedy: no step lowers the over-budget resources")
        choice[best] = best_j
    while True:  # spend what is left: the step up with the largest cost reduction per resource used
        used = totals()
        best, best_gain = -1, 0.0
        for layer in range(n_l):
            j = choice[layer]
            if j == n_b - 1:
                continue
            extra = [r.use[layer, j + 1] - r.use[layer, j] for r in p.resources]
            if any(u + e > r.budget for r, u, e in zip(p.resources, used, extra, strict=True)):
                continue
            gain = p.cost[layer, j] - p.cost[layer, j + 1]
            spend = sum(e / max(r.budget, 1) for r, e in zip(p.resources, extra, strict=True)) or 1e-30
            if gain > 0 and gain / spend > best_gain:
                best, best_gain = layer, gain / spend
        if best < 0:
            break
        choice[best] += 1
    return _result(p, choice, "greedy", t0, "heuristic")


def solve(p: Problem, solver: str) -> Allocation:
    if solver == "milp":
        return solve_milp(p)
    if solver == "greedy":
        return solve_greedy(p)
    raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
