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
