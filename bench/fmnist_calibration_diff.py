"""MSE minus min-max activation ranges on the same checkpoints and probes, paired over the seeds of a
``bench/fmnist_repro.py`` results file (one JSON line per run), with 95 % t-intervals; and the final
training loss of each probe (does it converge?).

    .venv/bin/python bench/fmnist_calibration_diff.py docs/results/fmnist8/runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fmnist_repro import paired_ci  # this folder is on sys.path when the script runs

BITS = ["fp", "8w8a", "4w4a", "3w3a", "2w8a", "2w4a"]


def ci(d: list[float]) -> str:
    """Mean [95 % t-interval] of paired differences (``fmnist_repro.paired_ci`` against zeros)."""
    m, lo, hi = paired_ci(d, [0.0] * len(d))
    return f"{m:+.1f}" if len(d) < 2 else f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print("| variant | probe | " + " | ".join(BITS) + " |\n|---|---|" + "---|" * len(BITS))
    for variant in sorted({r["variant"] for r in rows}):
        runs = [r for r in rows if r["variant"] == variant and {"mse", "minmax"} <= set(r.get("calibrations", {}))]
        for probe in ("bn", "linear"):
            cells = [ci([r["calibrations"]["mse"][b][probe] - r["calibrations"]["minmax"][b][probe] for r in runs]) for b in BITS]
            print(f"| {variant} (n={len(runs)}) | {probe} | " + " | ".join(cells) + " |")
    print("\nmean final training loss of each probe:")
    for variant in sorted({r["variant"] for r in rows}):
        runs = [r for r in rows if r["variant"] == variant]
        for cal in ("minmax", "mse"):
            for probe in ("linear", "bn"):
                losses = {b: round(statistics.mean(r["calibrations"][cal][b][f"{probe}_loss_curve"][-1] for r in runs), 2) for b in BITS}
                print(f"  {variant} {cal} {probe}: {losses}")


if __name__ == "__main__":
    main()
