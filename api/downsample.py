"""A job's metric history made small enough for a chart, with its shape kept (``?max_points=``).

A 10,000-step curve is a megabyte or more of JSON; a chart 400 pixels wide shows a few hundred
points. Taking every n-th sample would drop the spikes a user looks for (a loss that diverged for
ten steps), so the rows kept are chosen per series, min/max-preserving (as M4 / uPlot's own
decimation): each series (loss, lr, images/s and every numeric value of ``metrics``) is cut into
``k`` buckets of consecutive samples, and the rows holding each bucket's smallest and largest
value are kept, together with the first and the last row of every line (an eval job's probes,
``metrics.bits_index``, are lines of their own). ``k`` is the largest that keeps the union under
``max_points`` (a binary search: a handful of passes of O(rows) numpy work). Rows are kept whole,
so every kept row still carries all its values. The full history stays in the CSV
(``?format=csv``). docs/decisions/015.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: the numeric columns of a metric row (``metrics``' numeric values are series too)
COLUMNS = ("loss", "lr", "images_per_s")
#: values of ``metrics`` that say which line a row belongs to, not a series to draw
GROUP_KEYS = ("bits_index",)


def _column(values: list[Any]) -> np.ndarray:
    """Floats, NaN where a value is missing, not a number (a bool, a string) or not finite."""
    out = np.array([v if type(v) in (int, float) else np.nan for v in values], dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


def _series(rows: Sequence[Mapping[str, Any]]) -> tuple[list[_Series], np.ndarray]:
    """(every series of every line, the first and last position of every line)."""
    extras = [row.get("extra") if isinstance(row.get("extra"), dict) else {} for row in rows]
    keys = [(row.get("phase"), *(e.get(k) for k in GROUP_KEYS)) for row, e in zip(rows, extras, strict=True)]
    ids: dict[Any, int] = {}
    line = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    names = sorted({k for e in extras for k in e if k not in GROUP_KEYS})
    columns = [_column([row.get(c) for row in rows]) for c in COLUMNS]
    columns += [_column([e.get(k) for e in extras]) for k in names]
    series, ends = [], []
    for lid in range(len(ids)):
        mine = line == lid
        where = np.flatnonzero(mine)
        ends += [where[0], where[-1]]
        for col in columns:
            ok = np.flatnonzero(mine & ~np.isnan(col))
            if len(ok):
                series.append(_Series(ok, col[ok]))
    return series, np.unique(np.asarray(ends, dtype=np.int64))


class _Series:
    """One series' positions and values, with its extremes per bucket for a given bucket count."""

    def __init__(self, positions: np.ndarray, values: np.ndarray) -> None:
        self.positions, self.values = positions, values

    def extremes(self, k: int) -> np.ndarray:
        m = len(self.values)
        if m <= 2 * k:
            return self.positions
        bucket = (np.arange(m, dtype=np.int64) * k) // m  # nondecreasing, k buckets of about m / k
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        keep = []
        for reduce in (np.minimum, np.maximum):
            best = reduce.reduceat(self.values, starts)
            hits = np.flatnonzero(self.values == best[bucket])
            _, first = np.unique(bucket[hits], return_index=True)  # the first row reaching it, per bucket
            keep.append(self.positions[hits[first]])
        return np.concatenate(keep)


def keep_indices(rows: Sequence[Mapping[str, Any]], max_points: int) -> list[int]:
    """Indices (ascending) of at most ``max_points`` rows of ``rows`` (oldest first) that keep
    every line's first and last row and every series' extremes per bucket; all of them when
    ``rows`` is no longer than that."""
    n = len(rows)
    if n <= max_points:
        return list(range(n))
    series, ends = _series(rows)
    if len(ends) > max_points:  # more lines than points: evenly spaced rows, the first and last among them
        return sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)}) if max_points > 1 else [0]

    def kept(k: int) -> np.ndarray:
        return np.unique(np.concatenate([ends, *(s.extremes(k) for s in series)]))

    lo, hi = 0, max(1, max_points // 2)
    best = ends
    while lo < hi:  # the largest bucket count whose rows fit
        k = (lo + hi + 1) // 2
        rows_k = kept(k)
        if len(rows_k) <= max_points:
            lo, best = k, rows_k
        else:
            hi = k - 1
    return [int(i) for i in best]


def downsample(rows: Sequence[Mapping[str, Any]], max_points: int) -> list[Mapping[str, Any]]:
    """The rows :func:`keep_indices` keeps, in their order."""
    return [rows[i] for i in keep_indices(rows, max_points)]
