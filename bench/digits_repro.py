"""First experiment: does SSQL hold its accuracy at low bit-widths where SimSiam falls?

``simsiam`` and ``ssql`` pretrained on scikit-learn's real handwritten digits with the same
budget, then linear evaluation (cached path, the paper's lr/schedule) at fp, 8w8a, 4w4a, 3w3a,
2w8a and 2w4a, over several seeds; prints per-seed rows and a mean/std table.

    .venv/bin/python bench/digits_repro.py --seeds 0 1 2 --epochs 20 --threads 1 --out runs/digits_repro

A finished run folder is reused (pretraining resumes, so nothing is retrained): rerun with
``--protocol knn`` to evaluate the same checkpoints with the kNN protocol.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.evaluate import evaluate
from ssql_core.train import pretrain

BITS = ["fp", "8w8a", "4w4a", "3w3a", "2w8a", "2w4a"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["simsiam", "ssql"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--linear-lr", type=float, default=30.0)
    ap.add_argument("--protocol", default="linear", choices=["linear", "knn"])
    ap.add_argument("--out", default="runs/digits_repro")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch CPU threads (use 1 when other processes share the cores: oversubscribed "
                         "threads slow small models by 10x or more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: dict[str, dict[str, list[float]]] = {}
    t_start = time.perf_counter()
    for method in args.methods:
        for seed in args.seeds:
            wd = out / f"{method}_s{seed}"
            cfg = PretrainConfig(method=method, backbone="resnet18", dataset="digits", epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=seed, image_size=args.image_size,
                                 width=args.width, stem="cifar", checkpoint_every_steps=10**6)
            t0 = time.perf_counter()
            summary = pretrain(cfg, wd)
            t1 = time.perf_counter()
            rows = evaluate(EvalConfig(checkpoint=str(wd / "last.pt"), bits=BITS, protocol=args.protocol,
                                       epochs=args.linear_epochs, lr=args.linear_lr, seed=seed, calib_images=128), wd)
            t2 = time.perf_counter()
            z = summary["final_z_std"]  # None when the run was already complete (reused checkpoint)
            print(f"{method} seed {seed}: pretrain {t1 - t0:.0f}s (loss {summary['final_loss']:.3f}, z_std {z if z is None else round(z, 3)}), eval {t2 - t1:.0f}s: "
                  + " ".join(f"{r['bits']}={r['top1']:.1f}" for r in rows), flush=True)
            for r in rows:
                results.setdefault(method, {}).setdefault(r["bits"], []).append(r["top1"])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; total {time.perf_counter() - t_start:.0f}s")
    print(f"digits (1442 train / 355 test), resnet18 width {args.width} cifar stem {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; "
          + (f"linear eval ({args.linear_epochs} epochs, lr {args.linear_lr}, cached features" if args.protocol == "linear" else "kNN eval (k=200, T=0.1")
          + f", 128 calibration images); seeds {args.seeds}")
    header = "| method | " + " | ".join(BITS) + " |"
    print(header)
    print("|" + "---|" * (len(BITS) + 1))
    for method, per_bits in results.items():
        cells = []
        for b in BITS:
            v = per_bits[b]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.1f} ± {sd:.1f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    (out / f"results_{args.protocol}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
