"""SQAKD vs plain PTQ on scikit-learn's digits (real data), CPU-sized.

One SSQL pretrain (ResNet-18, width 0.25, 16 px, CIFAR stem), a linear evaluation that writes the
``fp`` head (and the per-bit-width linear heads of the standard PTQ protocol), then for every
seed x bit-width x quantizer a label-free SQAKD run. Reported per bit-width, mean and std over
seeds, test top-1 (%):

* ``PTQ``: PSQ post-training quantization of the teacher + its FP head (label-free, the same
  calibration images and head as the student starts from: the fair baseline);
* ``PTQ+linear``: the evaluation protocol's number (a linear head trained *with labels* on the
  PTQ features), for reference;
* one column per quantizer: the distilled student.

Run: ``.venv/bin/python bench/sqakd_digits.py`` (writes ``runs/sqakd_digits/``; reuses a finished
pretrain there). Uses one thread per process: on a shared 2-core machine more threads spin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.distill import DistillConfig, distill, distill_baselines
from ssql_core.evaluate import evaluate, format_table
from ssql_core.quantizers import QUANTIZER_NAMES
from ssql_core.train import pretrain


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/sqakd_digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", nargs="+", default=["4w4a", "2w2a"])
    p.add_argument("--quantizers", nargs="+", default=list(QUANTIZER_NAMES), choices=QUANTIZER_NAMES)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--distill-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ewgs-hessian", action="store_true",
                   help="EWGS delta from the Hutchinson Hessian trace (files tagged -ewgs_hessian)")
    p.add_argument("--baselines-only", action="store_true",
                   help="no training: PTQ and BN re-estimation top-1 of each initial student (seconds)")
    return p.parse_args()


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def table(rows: list[dict[str, Any]], bits: list[str], quantizers: list[str]) -> str:
    head = ["bits", "PTQ", "PTQ+linear", *quantizers, "best gain vs PTQ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bits:
        rs = [r for r in rows if r["bits"] == b]
        ptq = [r["ptq_top1"] for r in rs if r["quantizer"] == quantizers[0]]
        cells = [b, mean_std(ptq), f"{rs[0].get('ptq_linear_top1', float('nan')):.1f}"]
        gains = {}
        for q in quantizers:
            tops = [r["top1"] for r in rs if r["quantizer"] == q]
            cells.append(mean_std(tops))
            gains[q] = statistics.mean(tops) - statistics.mean(ptq)
        best = max(gains, key=gains.get)  # type: ignore[arg-type]
        cells.append(f"{gains[best]:+.1f} ({best})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baselines_table(rows: list[dict[str, Any]], bits: list[str], quantizers: list[str]) -> str:
    """Top-1 of each initial student after BN re-estimation alone (no training), mean ± std."""
    head = ["bits", "PTQ", *[f"{q} (BN re-est.)" for q in quantizers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bits:
        rs = [r for r in rows if r["bits"] == b]
        cells = [b, mean_std([r["ptq_top1"] for r in rs if r["quantizer"] == quantizers[0]])]
        cells += [mean_std([r["bn_recalibrated_top1"] for r in rs if r["quantizer"] == q]) for q in quantizers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.perf_counter()
    pcfg = PretrainConfig(method="ssql", backbone="resnet18", dataset="digits", epochs=a.pretrain_epochs,
                          batch_size=128, lr=0.05, width=0.25, image_size=16, seed=0, channels_last=False)
    pretrain(pcfg, out / "pretrain")
    t_pre = time.perf_counter() - t0
    ev = EvalConfig(checkpoint=str(out / "pretrain" / "last.pt"), bits=["fp", *a.bits], epochs=100, batch_size=256)
    eval_rows = evaluate(ev, out / "pretrain")
    print(format_table(eval_rows), flush=True)
    t_eval = time.perf_counter() - t0 - t_pre
    rows: list[dict[str, Any]] = []
    tag = "-ewgs_hessian" if a.ewgs_hessian else ""
    if a.baselines_only:
        for seed in a.seeds:
            for bits in a.bits:
                for q in a.quantizers:
                    rows.append(distill_baselines(DistillConfig(
                        checkpoint=str(out / "pretrain" / "last.pt"), heads=str(out / "pretrain" / "heads.pt"),
                        bits=bits, quantizer=q, seed=seed)))
        md = baselines_table(rows, a.bits, a.quantizers)
        (out / "baselines.json").write_text(json.dumps(rows, indent=2))
        (out / "baselines.md").write_text(md + "\n")
        print(md)
        print(f"seconds {time.perf_counter() - t0:.1f}")
        return
    for seed in a.seeds:
        for bits in a.bits:
            for q in a.quantizers:
                t = time.perf_counter()
                cfg = DistillConfig(checkpoint=str(out / "pretrain" / "last.pt"), heads=str(out / "pretrain" / "heads.pt"),
                                    bits=bits, quantizer=q, epochs=a.distill_epochs, batch_size=a.batch_size, seed=seed,
                                    ewgs_hessian=a.ewgs_hessian)
                r = distill(cfg, out / f"distill{tag}" / f"s{seed}_{bits}_{q}")
                r["seconds"] = round(time.perf_counter() - t, 1)
                rows.append(r)
                print(f"seed {seed} {bits} {q:>6}: PTQ {r['ptq_top1']:.1f} -> SQAKD {r['top1']:.1f} "
                      f"(KL {r['kl_start']:.1f} -> {r['kl_end']:.1f}, {r['seconds']}s)", flush=True)
    md = table(rows, a.bits, a.quantizers)
    total = time.perf_counter() - t0
    summary = {
        "args": vars(a), "pretrain_config": pcfg.to_dict(), "eval_rows": eval_rows, "distill_rows": rows,
        "teacher_fp_top1": next(r["top1"] for r in eval_rows if r["bits"] == "fp"),
        "seconds": {"pretrain": round(t_pre, 1), "eval": round(t_eval, 1), "total": round(total, 1)},
        "distill_steps_per_run": rows[0]["steps"] if rows else 0,
    }
    (out / f"results{tag}.json").write_text(json.dumps(summary, indent=2))
    (out / f"table{tag}.md").write_text(md + "\n")
    print(md)
    print(f"teacher FP top-1 {summary['teacher_fp_top1']:.1f}; pretrain {a.pretrain_epochs} epochs, distill "
          f"{a.distill_epochs} epochs x {summary['distill_steps_per_run']} steps, batch {a.batch_size}; "
          f"seconds {summary['seconds']}")


if __name__ == "__main__":
    main()
