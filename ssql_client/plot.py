"""The field's picture: top-1 against bit-width, one line per job, FP as a dashed reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: the paper's order of bit-widths on the x axis; others follow, weight bits then activation bits descending
PAPER_ORDER: tuple[str, ...] = ("fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a")


def bits_order(bits: Sequence[str]) -> list[str]:
    """``bits`` sorted as the paper's table: its own set first in its order, any others after."""

    def key(b: str) -> tuple[int, int, int]:
        if b in PAPER_ORDER:
            return (0, PAPER_ORDER.index(b), 0)
        w, _, a = b.rstrip("a").partition("w")
        try:
            return (1, -int(w), -int(a))
        except ValueError:
            return (2, 0, 0)

    return sorted(set(bits), key=key)


def series(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """bits -> top-1 of an eval job's rows (rows without a top-1 are left out)."""
    return {str(r["bits"]): float(r["top1"]) for r in rows if r.get("top1") is not None and r.get("bits")}


def plot_top1(jobs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path | None = None,
              title: str = "top-1 vs bit-width", ax: Any = None, show: bool | None = None) -> Any:
    """One line per job (``label -> result rows``) of top-1 against bit-width in the paper's order,
    with each job's FP top-1 as a dashed horizontal reference. Writes ``out`` (PNG, SVG, PDF...)
    when given; returns the matplotlib Axes (draw into your own with ``ax=``, e.g. in a notebook).

    ``show``: call ``plt.show()`` (a window from a script, the figure in a notebook); by default
    when neither ``out`` nor ``ax`` is given, the figure would otherwise be drawn nowhere."""
    import matplotlib

    if out is not None and ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: series(rows) for label, rows in jobs.items()}
    xs = [b for b in bits_order([b for s in data.values() for b in s]) if b != "fp"] or ["fp"]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, s) in enumerate(data.items()):
        color = f"C{i % 10}"
        pts = [(k, s[b]) for k, b in enumerate(xs) if b in s]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
        if "fp" in s:
            ax.axhline(s["fp"], color=color, linestyle="--", linewidth=1, label=f"{label} (fp {s['fp']:.1f})")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel("bit-width (weights w / activations a)")
    return _finish(ax, fig, title, out, show)


def _finish(ax: Any, fig: Any, title: str, out: str | Path | None, show: bool | None) -> Any:
    """Label, save (``out``) and show the chart the way both plots do; a figure this module made
    is closed after saving unless it is to be shown."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if out is not None:
        (fig or ax.figure).tight_layout()
        (fig or ax.figure).savefig(out)
        if fig is not None and not show:
            plt.close(fig)
    if show or (show is None and out is None and fig is not None):
        plt.show()
    return ax


def _source(row: Mapping[str, Any]) -> str:
    """Where a row's configuration came from: an autobit allocation, a per-layer map, or one bit-width."""
    return "autobit" if row.get("autobit") else "map" if str(row["bits"]).startswith("mixed-") else "uniform"


def _has_size(row: Mapping[str, Any]) -> bool:
    return row.get("top1") is not None and isinstance(row.get("model_bytes"), (int, float)) and row["model_bytes"] > 0


def pareto_series(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """An eval job's quantized rows that carry their size, as (name, rows by size) per source
    (uniform, autobit, map) and PTQ method, e.g. ``"uniform · adaround"``. Two rows of one source
    at the same size (4w4a and 4w8a store the same weights) go to series split by activation bits,
    so a line never doubles back on itself; the dashboard (api/static/pareto.js) does the same."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("bits") != "fp" and _has_size(r):
            groups.setdefault(_source(r), []).append(r)
    out: list[tuple[str, list[Mapping[str, Any]]]] = []
    for source, members in groups.items():
        ptq = "+".join(dict.fromkeys(str(r.get("ptq") or "calibrate") for r in members))
        collide = len({r["model_bytes"] for r in members}) < len(members)
        parts: dict[str, list[Mapping[str, Any]]] = {}
        for r in members:
            w, sep, a = str(r["bits"]).rstrip("a").partition("w")
            act = f"{a}-bit act." if collide and sep and w.isdigit() and a.isdigit() else ""
            key, n = act, 1
            while any(o["model_bytes"] == r["model_bytes"] for o in parts.get(key, [])):
                n += 1
                key = f"{act} ({n})".strip()
            parts.setdefault(key, []).append(r)
        for key, rs in parts.items():
            out.append((f"{source} · {ptq}" + (f" · {key}" if key else ""), sorted(rs, key=lambda r: r["model_bytes"])))
    return out


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows no other row beats (none as small or smaller with a top-1 as high or higher, one of
    the two strictly), by size."""
    sized = [r for r in rows if _has_size(r)]
    front = [r for r in sized if not any(
        o is not r and o["model_bytes"] <= r["model_bytes"] and o["top1"] >= r["top1"]
        and (o["model_bytes"] < r["model_bytes"] or o["top1"] > r["top1"]) for o in sized)]
    return sorted(front, key=lambda r: r["model_bytes"])


def plot_pareto(jobs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path | None = None,
                title: str = "top-1 vs model size", ax: Any = None, show: bool | None = None, x: str = "size") -> Any:
    """Top-1 against the packed model's size (``x="size"``, KB) or its average weight bits
    (``x="bits"``): per job (``label -> result rows``) one line per source and PTQ method
    (:func:`pareto_series`), each job's FP top-1 dashed. Rows without a size (written before sizes
    were recorded) are left out. ``out``, ``ax`` and ``show`` as :func:`plot_top1`."""
    import matplotlib

    if x not in ("size", "bits"):
        raise ValueError(f"x must be 'size' or 'bits', not {x!r}")
    if out is not None and ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "model_bytes" if x == "size" else "weight_bits_avg"
    scale = 1000.0 if x == "size" else 1.0
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    k = 0
    for label, rows in jobs.items():
        prefix = f"{label}: " if len(jobs) > 1 else ""
        first = k
        for name, rs in pareto_series(rows):
            pts = [(float(r[key]) / scale, float(r["top1"])) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{k % 10}", label=prefix + name,
                        gid=f"pareto-{k}")  # the group's id in an SVG: its points are countable there
                k += 1
        fp = series(rows).get("fp")
        if fp is not None:
            ax.axhline(fp, color=f"C{first % 10}", linestyle="--", linewidth=1, label=f"{prefix}fp {fp:.1f}",
                       gid=f"pareto-fp-{first}")
    ax.set_xlabel("model size (KB, packed)" if x == "size" else "average weight bits")
    return _finish(ax, fig, title, out, show)


def plot_results(jobs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path | None = None,
                 show: bool | None = None) -> Any:
    """What ``ssql results --plot`` draws: top-1 vs bit-width, and beside it top-1 vs model size
    when any row carries its size (eval rows since decision 020). Returns the Figure."""
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = any(_has_size(r) for rows in jobs.values() for r in rows if r.get("bits") != "fp")
    fig, axes = plt.subplots(1, 2 if sized else 1, figsize=(13 if sized else 7, 4.6), dpi=120, squeeze=False)
    plot_top1(jobs, ax=axes[0][0], show=False)
    if sized:
        plot_pareto(jobs, ax=axes[0][1], show=False)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out)
        if not show:
            plt.close(fig)
    if show or (show is None and out is None):
        plt.show()
    return fig
