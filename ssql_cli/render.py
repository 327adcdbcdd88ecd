"""Terminal output: a one-line progress bar and plain tables."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "--:--"
    m, s = divmod(int(eta), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def eval_position(job: dict[str, Any]) -> dict[str, Any] | None:
    """Where a linear-probe eval job is: the bit-width being probed (``index`` of ``count``) and
    the epoch of that probe. Its progress counts epochs summed over every bit-width (bit-width
    ``i``, epoch ``e`` of ``E`` reports ``i * E + e`` of ``count * E``), which read alone says
    "epoch 1/140"; None for other jobs or before the first epoch."""
    p, cfg = job.get("progress") or {}, ((job.get("spec") or {}).get("config") or {})
    bits, per = cfg.get("bits"), cfg.get("epochs")
    if job.get("kind") != "eval" or p.get("phase") != "linear" or not isinstance(bits, list) or not bits:
        return None
    if not isinstance(per, int) or per < 1 or not p.get("epoch"):
        return None
    index = min((int(p["epoch"]) - 1) // per, len(bits) - 1)
    return {"bits": bits[index], "index": index, "count": len(bits), "epoch": int(p["epoch"]) - index * per, "epochs": per}


def progress_line(job: dict[str, Any], width: int = 28) -> str:
    p = job.get("progress") or {}
    frac = float(p.get("fraction") or 0.0)
    filled = int(round(frac * width))
    bar = "#" * filled + "-" * (width - filled)
    parts = [f"{job['kind']:<8} {job['status']:<9} [{bar}] {frac * 100:5.1f}%"]
    probe = eval_position(job)
    if probe is not None:  # an eval job: which bit-width's probe, and its own epoch
        parts.append(f"{probe['bits']} ({probe['index'] + 1}/{probe['count']}) epoch {probe['epoch']}/{probe['epochs']}")
    elif p.get("epoch") is not None and p.get("epochs"):
        parts.append(f"epoch {p['epoch']}/{p['epochs']}")
    if p.get("phase"):
        parts.append(str(p["phase"]))
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("images_per_s"):
        parts.append(f"{p['images_per_s']:.0f} img/s")
    if job["status"] == "running":
        parts.append(f"eta {_fmt_eta(p.get('eta_s'))}")
    if job.get("attempts", 0) > 1:
        parts.append(f"attempt {job['attempts']}")
    return "  ".join(parts)


class LiveProgress:
    """Rewrites one terminal line per update (a new line per update when not a TTY)."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out, self.tty, self.last = out, out.isatty(), ""

    def __call__(self, job: dict[str, Any]) -> None:
        line = progress_line(job)
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                self.out.write("\n")
        else:
            self.out.write(line + "\n")
        self.out.flush()


    def retrying(self, error: Exception, tries: int) -> None:
        """The connection was lost while waiting: say so (on its own line) and keep waiting."""
        if self.tty and self.last:
            self.out.write("\n")
        self.out.write(f"{error} - retrying ({tries})\n")
        self.out.flush()
        self.last = ""


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
