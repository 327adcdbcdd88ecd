"""Does SSQL's low-bit advantage survive a stronger PTQ? Calibration vs AdaRound vs BRECQ on the
SSQL and SimSiam backbones of ``bench/fmnist_repro.py``, paired seeds; and autobit vs uniform
weight bits at equal size on the same backbones.

Every run (variant, seed) pretrains exactly as ``fmnist_repro.py`` does (same subset, order,
settings: with the same arguments the backbone is the one its table evaluated), then, on the
full 10 000-image test split, per bit-width (``--bits``):

* ``calibrate``: MSE ranges from 128 training images, nearest rounding (our evaluation default);
* ``adaround`` / ``brecq``: the same ranges, then :func:`ssql_core.ptq.reconstruct` on
  ``--ptq-images`` training images, ``--ptq-iters`` Adam steps per unit (layer / residual block);
  the time of every unit is recorded;

and reads each out with the BN probe (lr chosen at fp on a held-out 20 % as in fmnist_repro).
``--autobit-budgets`` adds per-layer maps (:mod:`ssql_core.mixed_precision`, milp, at
``--autobit-a-bits`` activations) for both sensitivities, each beside the uniform bit-width of
the same average weight bits (``{budget}w{a}a``, calibrated the same way).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/ptq_recon.py --seeds 0 1 2 3 4 5 6 7 --jobs 2 \\
        --ptq-iters 500 --ptq-images 512 --out runs/ptq_recon --results docs/results/ptq_recon/runs.jsonl
    .venv/bin/python bench/ptq_recon.py --seeds 0 1 2 3 4 5 6 7 --out runs/ptq_recon \\
        --results docs/results/ptq_recon/runs.jsonl --summary          # the tables again
    OMP_NUM_THREADS=1 .venv/bin/python bench/ptq_recon.py --timing runs/ptq_recon/ssql_s0/last.pt   # seconds per unit

Resumable per run like fmnist_repro (one JSON line per finished run in ``--results``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from fmnist_repro import Evaluator, add_recipe_args, append_run, finished_runs, paired_ci, pcfg_for

from ssql_core.bitconfig import as_bits, footprint, layer_table
from ssql_core.config import EvalConfig
from ssql_core.evaluate import calibration_images, train_linear_cached
from ssql_core.mixed_precision.autobit import AutobitConfig, allocate, costs_for
from ssql_core.ptq import ReconConfig, apply_reconstruction, clear_rounding, reconstruct
from ssql_core.runtime import cpu_name
from ssql_core.train import pretrain

PTQS = ("calibrate", "adaround", "brecq")


def bn_top1(ev: Evaluator, bits: Any, bn_lr: float) -> float:
    return ev.probe(*ev.features(bits), "bn", bn_lr)["top1"]


def ptq_rows(ev: Evaluator, args: argparse.Namespace, bn_lr: float) -> dict[str, Any]:
    """bits -> ptq -> top-1 (and each reconstruction's per-unit record)."""
    images = calibration_images(ev.train_plain, args.ptq_images, ev.seed, 256)
    out: dict[str, Any] = {}
    for b in args.bits:
        out[b] = {}
        for ptq in args.ptq:
            ev.calibrate(b, "mse")
            row: dict[str, Any] = {}
            if ptq != "calibrate":
                rec = reconstruct(ev.backbone, ev.ctx, images, ev.device, b,
                                  ReconConfig(method=ptq, iters=args.ptq_iters, seed=ev.seed))
                apply_reconstruction(ev.backbone, rec)
                row = {"seconds": round(rec.seconds, 2), "units": [
                    {k: u.get(k) for k in ("unit", "loss_nearest", "loss_learned", "kept", "seconds")} for u in rec.units]}
            try:
                row["top1"] = bn_top1(ev, b, bn_lr)
            finally:
                clear_rounding(ev.backbone)
            out[b][ptq] = row
            print(f"  {b} {ptq}: {row['top1']:.2f}" + (f" ({row['seconds']:.0f} s)" if "seconds" in row else ""), flush=True)
    return out


def autobit_rows(ev: Evaluator, args: argparse.Namespace, bn_lr: float) -> dict[str, Any]:
    """budget -> uniform / hessian / quant_error: top-1, average weight bits, packed bytes."""
    a = args.autobit_a_bits
    table = layer_table(ev.backbone, ev.pcfg.image_size)
    tr_f, tr_y, _, _ = ev.features("fp")
    cfg = EvalConfig(checkpoint="-", probe="bn", lr=bn_lr, epochs=args.linear_epochs, seed=ev.seed, batch_size=256)
    with torch.enable_grad():
        head = train_linear_cached(tr_f, tr_y, 10, cfg, lambda e, loss: None)
    images = calibration_images(ev.train_plain, 256, ev.seed, 256)
    costs: dict[str, Any] = {}
    for sens in ("hessian", "quant_error"):
        t0 = time.perf_counter()
        c, _ = costs_for(AutobitConfig(budget_bits=8.0, sensitivity=sens, a_bits=a).validate(), ev.backbone, ev.ctx, images,
                         ev.device, head, ev.pcfg.rounding or "reciprocal", ev.seed)
        costs[sens] = (c, time.perf_counter() - t0)
    out: dict[str, Any] = {}
    for budget in args.autobit_budgets:
        key = f"{budget:g}"
        out[key] = {}
        uni = f"{int(budget)}w{a}a" if float(budget).is_integer() else None
        choices: list[tuple[str, Any, dict[str, Any]]] = []
        if uni is not None:
            choices.append(("uniform", as_bits(uni, ev.backbone), {}))
        for sens in ("hessian", "quant_error"):
            config, alloc = allocate(table, AutobitConfig(budget_bits=budget, sensitivity=sens, a_bits=a).validate(), costs[sens][0])
            choices.append((sens, as_bits(config.as_dict(), ev.backbone),
                            {"objective": alloc.objective, "sensitivity_s": round(costs[sens][1], 1), "map": config.as_dict()}))
        for name, bits, extra in choices:
            ev.calibrate(bits, "mse")
            fp = footprint(table, bits)
            out[key][name] = {"top1": bn_top1(ev, bits, bn_lr), "weight_bits_avg": fp.get("weight_bits_avg"),
                              "model_bytes": fp.get("model_bytes"), **extra}
            print(f"  autobit budget {key} {name}: {out[key][name]['top1']:.2f}", flush=True)
    return out


def timing(args: argparse.Namespace) -> str:
    """Seconds per reconstruction unit of one backbone (``--timing CHECKPOINT``), nothing else
    running in this process: a table per unit, with the unit's weights and the seconds of each
    method at each of ``--bits``."""
    torch.set_num_threads(1)
    ev = Evaluator(Path(args.timing), args, 0)
    images = calibration_images(ev.train_plain, args.ptq_images, 0, 256)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in ev.backbone.named_modules()}
    secs: dict[tuple[str, str], dict[str, float]] = {}
    for method in [p for p in args.ptq if p != "calibrate"]:
        for b in args.bits:
            ev.calibrate(b, "mse")
            rec = reconstruct(ev.backbone, ev.ctx, images, ev.device, b, ReconConfig(method=method, iters=args.ptq_iters, seed=0))
            secs[(method, b)] = {u["unit"]: u["seconds"] for u in rec.units}
            print(f"{method} {b}: {rec.seconds:.1f} s over {len(rec.units)} units", flush=True)
    lines = [f"machine: {cpu_name()}, 1 torch thread; {args.ptq_images} images, {args.ptq_iters} iterations per unit, "
             "batch 32", "", "| method | unit | weights | " + " | ".join(f"s at {b}" for b in args.bits) + " |",
             "|---|---|---:|" + "---:|" * len(args.bits)]
    for method in dict.fromkeys(m for m, _ in secs):
        for unit in secs[(method, args.bits[0])]:
            lines.append(f"| {method} | {unit} | {params.get(unit, 0):,} | "
                         + " | ".join(f"{secs[(method, b)].get(unit, float('nan')):.2f}" for b in args.bits) + " |")
        lines.append(f"| {method} | **total** | | " + " | ".join(f"{sum(secs[(method, b)].values()):.1f}" for b in args.bits) + " |")
    return "\n".join(lines)


def run_one(task: tuple[str, int, dict[str, Any]]) -> str:
    variant, seed, a = task
    args = argparse.Namespace(**a)
    torch.set_num_threads(1)
    if (variant, seed) in finished_runs(args):
        return f"{variant} s{seed}: already in {args.results}"
    out = Path(args.out) / f"{variant}_s{seed}"
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    if not (out / "last.pt").is_file():
        summary = pretrain(pcfg_for(args, variant, seed), out)
    t1 = time.perf_counter()
    ev = Evaluator(out / "last.pt", args, seed)
    bn_lr, _ = ev.choose_bn_lr()
    fp_top1 = bn_top1(ev, "fp", bn_lr)
    res: dict[str, Any] = {"variant": variant, "seed": seed, "pretrain_s": round(t1 - t0, 1), "final_loss": summary.get("final_loss"),
                           "bn_lr": bn_lr, "fp": fp_top1, "machine": cpu_name(),
                           "settings": {k: a[k] for k in ("train_samples", "epochs", "width", "image_size", "batch_size", "lr",
                                                           "linear_epochs", "ptq_images", "ptq_iters")}}
    res["ptq"] = ptq_rows(ev, args, bn_lr)
    t2 = time.perf_counter()
    res["ptq_s"] = round(t2 - t1, 1)
    if args.autobit_budgets:
        res["autobit"] = autobit_rows(ev, args, bn_lr)
        res["autobit_s"] = round(time.perf_counter() - t2, 1)
    append_run(args, res)
    return f"{variant} s{seed}: pretrain {t1 - t0:.0f}s, ptq {res['ptq_s']:.0f}s"


def _ci_cell(a: list[float], b: list[float]) -> str:
    m, lo, hi = paired_ci(a, b)
    verdict = "**held**" if lo > 0 else ("**reversed**" if hi < 0 else "n.s.")
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] {verdict}"


def summarize(args: argparse.Namespace) -> str:
    recs: dict[str, dict[int, dict[str, Any]]] = {}
    for (v, s), r in finished_runs(args).items():
        if s in args.seeds:
            recs.setdefault(v, {})[s] = r

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else (f"{v[0]:.1f}" if v else "-")

    variants = [v for v in ("simsiam", "ssql") if v in recs] + sorted(v for v in recs if v not in ("simsiam", "ssql"))
    common = sorted(set(recs.get("ssql", {})) & set(recs.get("simsiam", {})))
    rows = [("fp", "-", lambda r: r["fp"])] + [
        (b, p, (lambda r, b=b, p=p: r["ptq"][b][p]["top1"])) for b in args.bits for p in args.ptq]
    lines = ["**top-1 % (BN probe), mean ± std over seeds; SSQL - SimSiam paired by seed**", "",
             "| bits | PTQ | " + " | ".join(f"{v} (n={len(recs[v])})" for v in variants)
             + (f" | ssql - simsiam (95% CI, n={len(common)})" if common else "") + " |",
             "|---|---|" + "---|" * (len(variants) + bool(common))]
    for b, p, get in rows:
        cells = [ms([get(recs[v][s]) for s in sorted(recs[v])]) for v in variants]
        if common:
            cells.append(_ci_cell([get(recs["ssql"][s]) for s in common], [get(recs["simsiam"][s]) for s in common]))
        lines.append(f"| {b} | {p} | " + " | ".join(cells) + " |")
    recon = [p for p in args.ptq if p != "calibrate"]
    lines += ["", "**reconstruction - calibration** (points of top-1, paired by seed, 95% CI; objective: the "
              "reconstructed units' summed loss with the kept rounding / with nearest rounding, median over runs; kept: "
              "units whose learned rounding beat nearest on the calibration images)", "",
              "| bits | PTQ | " + " | ".join(f"{v}" for v in variants)
              + (" | ssql's gain - simsiam's (95% CI)" if common else "") + " | objective ratio | kept learned |",
              "|---|---|" + "---|" * (len(variants) + 2 + bool(common))]
    for b in args.bits:
        for p in recon:
            cells = []
            for v in variants:
                seeds = sorted(recs[v])
                cells.append(_ci_cell([recs[v][s]["ptq"][b][p]["top1"] for s in seeds],
                                      [recs[v][s]["ptq"][b]["calibrate"]["top1"] for s in seeds]))
            if common:  # does the SSQL - SimSiam difference change with reconstruction? (paired by seed)
                gain = {v: [recs[v][s]["ptq"][b][p]["top1"] - recs[v][s]["ptq"][b]["calibrate"]["top1"] for s in common]
                        for v in ("ssql", "simsiam")}
                cells.append(_ci_cell(gain["ssql"], gain["simsiam"]))
            units = [r["ptq"][b][p].get("units", []) for by in recs.values() for r in by.values()]
            ratios = [sum(min(u["loss_learned"], u["loss_nearest"]) for u in us) / sum(u["loss_nearest"] for u in us)
                      for us in units if us]
            kept = sum(u["kept"] == "learned" for us in units for u in us)
            n_units = sum(len(us) for us in units)
            lines.append(f"| {b} | {p} | " + " | ".join(cells)
                         + f" | {statistics.median(ratios):.3f} | {kept}/{n_units} |" if ratios else " | - | - |")
    secs: dict[tuple[str, str], list[float]] = {}
    for by in recs.values():
        for r in by.values():
            for b in args.bits:
                for p in recon:
                    secs.setdefault((p, b), []).extend(u["seconds"] for u in r["ptq"][b][p].get("units", []))
    if secs:
        lines += ["", "reconstruction seconds per unit (median [min, max] over units and runs; two runs shared the "
                  "2 cores): " + "; ".join(f"{p} {b} {statistics.median(v):.1f} [{min(v):.1f}, {max(v):.1f}] (n={len(v)})"
                                           for (p, b), v in sorted(secs.items()) if v)]
    budgets = sorted({k for by in recs.values() for r in by.values() for k in r.get("autobit", {})}, key=float)
    if budgets:
        lines += ["", "**autobit vs uniform at equal average weight bits** (top-1 % mean ± std; paired CI vs uniform)", "",
                  "| variant | budget (avg w bits) | uniform | hessian / milp | quant_error / milp | hessian - uniform | quant_error - uniform |",
                  "|---|---|---|---|---|---|---|"]
        for v, by in sorted(recs.items()):
            for k in budgets:
                seeds = sorted(s for s, r in by.items() if k in r.get("autobit", {}))
                if not seeds:
                    continue
                row = {n: [by[s]["autobit"][k][n]["top1"] for s in seeds] for n in ("uniform", "hessian", "quant_error")
                       if n in by[seeds[0]]["autobit"][k]}
                diffs = [_ci_cell(row[n], row["uniform"]) if "uniform" in row else "-" for n in ("hessian", "quant_error")]
                lines.append(f"| {v} (n={len(seeds)}) | {k} | {ms(row.get('uniform', []))} | {ms(row['hessian'])} | "
                             f"{ms(row['quant_error'])} | {diffs[0]} | {diffs[1]} |")
    lines.append("\nper-run wall time (s, pretrain / ptq / autobit): " + "; ".join(
        f"{v} s{s} {r['pretrain_s']:.0f}/{r['ptq_s']:.0f}/{r.get('autobit_s', 0):.0f}" for v, by in sorted(recs.items())
        for s, r in sorted(by.items())))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5, 6, 7])
    ap.add_argument("--variants", nargs="+", default=["simsiam", "ssql"])
    ap.add_argument("--bits", nargs="+", default=["4w4a", "3w3a", "2w4a"])
    ap.add_argument("--ptq", nargs="+", default=list(PTQS), choices=PTQS)
    ap.add_argument("--ptq-images", type=int, default=512)
    ap.add_argument("--ptq-iters", type=int, default=500, help="Adam steps per unit (batch 32)")
    ap.add_argument("--autobit-budgets", type=float, nargs="*", default=[3.0, 4.0])
    ap.add_argument("--autobit-a-bits", type=int, default=4)
    ap.add_argument("--results", default=None, help="JSON lines file: one line per finished run (the resumable record)")
    add_recipe_args(ap)
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs, one torch thread each")
    ap.add_argument("--out", default="runs/ptq_recon")
    ap.add_argument("--summary", action="store_true", help="only print the tables from finished runs")
    ap.add_argument("--timing", metavar="CHECKPOINT", help="only time the reconstructions of this backbone, per unit")
    args = ap.parse_args()
    if args.timing:
        print(timing(args))
        return
    if not args.summary:
        tasks = [(v, s, vars(args)) for s in args.seeds for v in args.variants]
        t0 = time.perf_counter()
        if args.jobs > 1:
            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for msg in pool.imap_unordered(run_one, tasks):
                    print(msg, flush=True)
        else:
            for t in tasks:
                print(run_one(t), flush=True)
        print(f"machine: {cpu_name()}; wall {time.perf_counter() - t0:.0f} s, {args.jobs} parallel run(s), one torch thread each")
    print(summarize(args))


if __name__ == "__main__":
    main()
