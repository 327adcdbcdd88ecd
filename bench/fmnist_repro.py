"""The paper's claim on Fashion-MNIST: does SSQL keep its accuracy at low bit-widths where SimSiam
loses it? SSQL vs SimSiam (and optionally a randomly initialised backbone), paired seeds.

Every run (variant, seed) pretrains on a seeded subset of the 60 000 training images, then is
evaluated at the paper's bit-widths on the full 10 000-image test split. Per bit-width and per
calibration (``--calibrations``, default ``mse minmax``; ranges from 128 test-transformed training
images) three read-outs of the same frozen features: the converged probe (a parameter-free
BatchNorm before the linear layer, lr chosen at fp on a held-out 20 % of the training subset),
the paper's linear protocol (SGD lr 30, momentum 0.9, 100 epochs, steps at 60/80 %) and kNN
(k=200, T=0.1). The primary table is MSE calibration + BN probe (docs/decisions/017); min-max
(SPEC 6) and the paper's probe are the secondary rows. ``--ablations`` adds the calibration
ablations and the activation statistics of issue 12; ``--ablation-variants`` the extra pretrains
(SSQL with ``preset="reference"``, with weights 4..8 bits).

    .venv/bin/python bench/fmnist_repro.py --seeds 0 1 2 3 4 5 6 7 --variants simsiam ssql \
        --ablation-variants --train-samples 8000 --epochs 6 --jobs 2 --out runs/fmnist8 \
        --results docs/results/fmnist8/runs.jsonl

Resumable: every finished run is appended, as one JSON line, to ``--results`` (and written to
``<out>/<variant>_s<seed>/result.json``); a run already in either is not run again, so an
interrupted bench continues where it stopped. ``--summary`` prints the tables from the results
only. Numbers and the machine go to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssql_core import checkpoint as ckpt
from ssql_core.bits import parse_bits
from ssql_core.calibration import calibrate_ranges, zero_rounding
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.data import Transformed, load_split, test_transform
from ssql_core.evaluate import (
    accuracy,
    calibration_images,
    calibration_set,
    extract,
    knn_top1,
    materialize,
    train_linear_cached,
)
from ssql_core.methods import build_method
from ssql_core.qnn import QuantContext, bind_context
from ssql_core.runtime import cpu_name
from ssql_core.train import load_pretrained, pretrain

BITS = ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a"]
ABL_BITS = ["4w4a", "3w3a", "2w4a"]
BN_LRS = [0.03, 0.1, 0.3, 1.0]


def pcfg_for(args: argparse.Namespace, method: str, seed: int, **extra: Any) -> PretrainConfig:
    return PretrainConfig(method=method, dataset="fashion_mnist", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=seed, image_size=args.image_size, width=args.width, stem="cifar", max_samples=args.train_samples,
                          checkpoint_every_steps=10**6, device="cpu", **extra)


def add_recipe_args(ap: argparse.ArgumentParser, train_samples: int = 8000, epochs: int = 6) -> None:
    """The pretraining recipe's flags (read by :func:`pcfg_for`); the benches that reuse these
    backbones share them. The defaults are the 8-seed table's settings."""
    ap.add_argument("--train-samples", type=int, default=train_samples)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)


@torch.no_grad()
def random_init_checkpoint(cfg: PretrainConfig, path: Path, images: int = 2048) -> None:
    """A never-trained backbone whose BN statistics are re-estimated on training images."""
    cfg = cfg.validate()
    torch.manual_seed(cfg.seed)
    method = build_method(cfg)
    split = load_split(cfg.dataset, True, cfg.image_size, None, False, cfg.max_samples, cfg.seed)
    plain = Transformed(split.data, test_transform(cfg.image_size, split.stats_key))
    for m in method.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch below
    method.backbone.train()
    for x, _ in calibration_images(plain, images, cfg.seed, 256):
        method.backbone(x)
    for m in method.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    ckpt.save_atomic({"kind": "pretrain", "format_version": ckpt.FORMAT_VERSION, "config": cfg.to_dict(),
                      "model": method.state_dict()}, path)


class Evaluator:
    """Features of one checkpoint at a bit-width under a calibration, and the three probes on them."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, seed: int) -> None:
        self.args, self.seed = args, seed
        self.pcfg, method = load_pretrained(checkpoint)
        self.backbone = method.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.ctx = bind_context(self.backbone, QuantContext(rounding=self.pcfg.rounding))
        size = self.pcfg.image_size
        self.train = load_split("fashion_mnist", True, size, max_samples=args.train_samples, seed=self.pcfg.seed)
        self.test = load_split("fashion_mnist", False, size)
        ttf = test_transform(size, self.train.stats_key)
        self.train_plain = materialize(Transformed(self.train.data, ttf))
        self.test_plain = materialize(Transformed(self.test.data, ttf))
        self.device = torch.device("cpu")

    def loader(self, ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=512)

    def calibrate(self, bits: Any, calibration: str = "minmax", images: int = 128, quantized_weights: bool = False) -> None:
        if (parse_bits(bits) if isinstance(bits, str) else bits).is_fp:  # a string, a BitWidth or a per-layer map
            return
        loader = calibration_set(calibration, self.train.data, self.train_plain, self.pcfg.image_size, self.train.stats_key,
                                 images, self.seed)
        calibrate_ranges(self.backbone, self.ctx, loader, self.device, bits, calibration, 99.99, quantized_weights, self.seed)

    def features(self, bits: Any) -> tuple[torch.Tensor, ...]:
        with self.ctx.quantized(bits):
            tr_f, tr_y = extract(self.backbone, self.loader(self.train_plain), self.device)
            te_f, te_y = extract(self.backbone, self.loader(self.test_plain), self.device)
        return tr_f, tr_y, te_f, te_y

    def probe(self, tr_f: torch.Tensor, tr_y: torch.Tensor, te_f: torch.Tensor, te_y: torch.Tensor, probe: str, lr: float) -> dict[str, Any]:
        cfg = EvalConfig(checkpoint="-", probe=probe, lr=lr, epochs=self.args.linear_epochs, seed=self.seed, batch_size=256)
        curve: list[float] = []
        with torch.enable_grad():
            head = train_linear_cached(tr_f, tr_y, 10, cfg, lambda e, loss: curve.append(round(loss, 4)))
        return {"top1": round(accuracy(head, te_f, te_y), 3), "loss_curve": curve}

    def choose_bn_lr(self) -> tuple[float, dict[str, float]]:
        """The BN probe's lr: best held-out accuracy at fp on 20 % of the training subset."""
        tr_f, tr_y, _, _ = self.features("fp")
        n_val = len(tr_f) // 5
        perm = torch.randperm(len(tr_f), generator=torch.Generator().manual_seed(self.seed))
        val, fit = perm[:n_val], perm[n_val:]
        scores = {str(lr): self.probe(tr_f[fit], tr_y[fit], tr_f[val], tr_y[val], "bn", lr)["top1"] for lr in BN_LRS}
        best = max(BN_LRS, key=lambda lr: scores[str(lr)])
        return best, scores

    def all_probes(self, bits: str, bn_lr: float) -> dict[str, Any]:
        tr_f, tr_y, te_f, te_y = self.features(bits)
        paper = self.probe(tr_f, tr_y, te_f, te_y, "linear", 30.0)
        bn = self.probe(tr_f, tr_y, te_f, te_y, "bn", bn_lr)
        knn = knn_top1(tr_f, tr_y, te_f, te_y, 10, 200, 0.1)
        return {"linear": paper["top1"], "linear_loss_curve": paper["loss_curve"], "bn": bn["top1"],
                "bn_loss_curve": bn["loss_curve"], "knn": round(knn, 3)}


def finished_runs(args: argparse.Namespace) -> dict[tuple[str, int], dict[str, Any]]:
    """Runs already recorded in the ``--results`` JSON lines file (the resumable record)."""
    path = Path(args.results) if getattr(args, "results", None) else None
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["variant"], r["seed"])] = r
    return done


def append_run(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """One finished run -> one line, appended and flushed (O_APPEND: parallel runs do not interleave)."""
    if getattr(args, "results", None):
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(res) + "\n")


def run_one(task: tuple[str, int, dict[str, Any]]) -> str:
    variant, seed, a = task
    args = argparse.Namespace(**a)
    torch.set_num_threads(1)
    out = Path(args.out) / f"{variant}_s{seed}"
    result_path = out / "result.json"
    if (variant, seed) in finished_runs(args):
        return f"{variant} s{seed}: already in {args.results}"
    if result_path.exists():
        append_run(args, json.loads(result_path.read_text()))
        return f"{variant} s{seed}: reused {result_path}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    if variant == "random":
        random_init_checkpoint(pcfg_for(args, "simsiam", seed), out / "last.pt")
    else:
        extra = {"ssql_reference": {"preset": "reference"}, "ssql_w4": {"w_bits": (4, 8)}}.get(variant, {})
        summary = pretrain(pcfg_for(args, variant.split("_")[0] if variant in ("ssql_reference", "ssql_w4") else variant, seed, **extra), out)
    t1 = time.perf_counter()
    ev = Evaluator(out / "last.pt", args, seed)
    bn_lr, lr_scores = ev.choose_bn_lr()
    res: dict[str, Any] = {"variant": variant, "seed": seed, "pretrain_s": round(t1 - t0, 1), "final_loss": summary.get("final_loss"),
                           "final_z_std": summary.get("final_z_std"), "bn_lr": bn_lr, "bn_lr_heldout": lr_scores,
                           "settings": {k: a[k] for k in ("train_samples", "epochs", "width", "image_size", "batch_size", "lr", "linear_epochs")},
                           "calibrations": {}}
    for calibration in args.calibrations:
        res["calibrations"][calibration] = {}
        for b in args.bits:
            ev.calibrate(b, calibration)
            res["calibrations"][calibration][b] = ev.all_probes(b, bn_lr)
    res["bits"] = res["calibrations"][args.calibrations[0]]  # the primary calibration, as issue 12's files had
    if args.ablations and variant in ("simsiam", "ssql"):
        abl: dict[str, Any] = {}
        for name, kw in {"reference": {"calibration": "reference"}, "percentile": {"calibration": "percentile"},
                         "mse": {"calibration": "mse"}, "calib1024": {"images": 1024},
                         "quantized_weights": {"quantized_weights": True}}.items():
            abl[name] = {}
            for b in ABL_BITS:
                ev.calibrate(b, **kw)
                tr_f, tr_y, te_f, te_y = ev.features(b)
                abl[name][b] = {"linear": ev.probe(tr_f, tr_y, te_f, te_y, "linear", 30.0)["top1"],
                                "bn": ev.probe(tr_f, tr_y, te_f, te_y, "bn", bn_lr)["top1"]}
        res["ablations"] = abl
        stats_loader = calibration_images(ev.train_plain, 512, seed + 1, 256)
        res["activation_stats"] = {}
        for b in ("4w4a", "2w4a"):
            ev.calibrate(b)
            res["activation_stats"][b] = zero_rounding(ev.backbone, ev.ctx, stats_loader, ev.device, b)
    res["eval_s"] = round(time.perf_counter() - t1, 1)
    result_path.write_text(json.dumps(res, indent=1))
    append_run(args, res)
    return f"{variant} s{seed}: pretrain {t1 - t0:.0f}s, eval {res['eval_s']:.0f}s, " + " ".join(
        f"{b}={res['bits'][b]['bn']:.1f}" for b in args.bits)


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b and its 95 % t-interval over pairs (same seed)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def _records(args: argparse.Namespace) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> run record, from ``--results`` and any ``<out>/*/result.json``."""
    res: dict[str, dict[int, dict[str, Any]]] = {}
    for p in sorted(Path(args.out).glob("*_s*/result.json")):
        r = json.loads(p.read_text())
        res.setdefault(r["variant"], {})[r["seed"]] = r
    for (variant, seed), r in finished_runs(args).items():
        res.setdefault(variant, {})[seed] = r
    return {v: {s: r for s, r in by.items() if s in args.seeds} for v, by in res.items()}


def _point(r: dict[str, Any], calibration: str, b: str, probe: str) -> float:
    return r.get("calibrations", {calibration: r["bits"]} if calibration == "minmax" else {})[calibration][b][probe]


def summarize(args: argparse.Namespace) -> str:
    res = _records(args)
    bits = args.bits
    lines: list[str] = []

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else (f"{v[0]:.1f}" if v else "-")

    titles = {"bn": "BN + linear probe (lr from held-out fp)", "linear": "paper's linear probe (lr 30)", "knn": "kNN k=200"}
    tables = [(c, pr) for c in args.calibrations for pr in ("bn", "linear", "knn")]
    for calibration, probe in tables:
        have = {v: {s: r for s, r in by.items() if calibration in r.get("calibrations", {"minmax": 1})} for v, by in res.items()}
        have = {v: by for v, by in have.items() if by}
        if not have:
            continue
        lines += [f"\n**{calibration} calibration, {titles[probe]}**: top-1 % mean ± std over seeds\n",
                  "| variant | n | " + " | ".join(bits) + " |", "|---|---|" + "---|" * len(bits)]
        for variant, by_seed in have.items():
            cells = [ms([_point(by_seed[s], calibration, b, probe) for s in by_seed]) for b in bits]
            lines.append(f"| {variant} | {len(by_seed)} | " + " | ".join(cells) + " |")
        pairs = [("ssql", "simsiam")] + [(v, "random") for v in ("ssql", "simsiam")]
        for a_name, b_name in pairs:
            if a_name not in have or b_name not in have:
                continue
            common = sorted(set(have[a_name]) & set(have[b_name]))
            cells = []
            for b in bits:
                m, lo, hi = paired_ci([_point(have[a_name][s], calibration, b, probe) for s in common],
                                      [_point(have[b_name][s], calibration, b, probe) for s in common])
                verdict = "**held**" if lo > 0 else ("**reversed**" if hi < 0 else "n.s.")
                cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] {verdict}")
            lines.append(f"| {a_name} - {b_name} (paired, 95% CI, n={len(common)}) | | " + " | ".join(cells) + " |")
    lines.append("\nper-run wall time (s, pretrain / eval): " + "; ".join(
        f"{v} s{s} {r['pretrain_s']:.0f}/{r['eval_s']:.0f}" for v, by in res.items() for s, r in sorted(by.items())))
    lines.append("held-out BN-probe lr per run: " + ", ".join(f"{v} s{s} {r['bn_lr']}" for v, by in res.items() for s, r in sorted(by.items())))
    zs = [(v, s, r.get("final_z_std")) for v, by in res.items() for s, r in sorted(by.items()) if r.get("final_z_std")]
    if zs:
        lines.append("final per-dimension std of the normalised projection (1/sqrt(d) = 0.044 for d=512; collapse -> 0): "
                     + ", ".join(f"{v} s{s} {z:.3f}" for v, s, z in zs))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["simsiam", "ssql"])
    ap.add_argument("--ablation-variants", nargs="*", default=[])
    ap.add_argument("--ablations", action="store_true", help="issue 12's calibration ablations and activation statistics")
    ap.add_argument("--calibrations", nargs="+", default=["mse", "minmax"], choices=["mse", "minmax", "percentile", "reference"],
                    help="the first is the primary table")
    ap.add_argument("--bits", nargs="+", default=["fp", "8w8a", "4w4a", "3w3a", "2w8a", "2w4a"])
    ap.add_argument("--results", default=None, help="JSON lines file: one line per finished run (the resumable record)")
    ap.add_argument("--ablation-seeds", nargs="*", type=int, default=[0, 1])
    add_recipe_args(ap, train_samples=10000, epochs=8)
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs, one torch thread each")
    ap.add_argument("--out", default="runs/fmnist_repro")
    ap.add_argument("--summary", action="store_true", help="only print the tables from finished runs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    settings = {k: vars(args)[k] for k in ("train_samples", "epochs", "width", "image_size", "batch_size", "lr", "linear_epochs")}
    finished = finished_runs(args)
    other = {f"{v} s{s}": r.get("settings") for (v, s), r in finished.items() if r.get("settings", settings) != settings}
    if other:
        raise SystemExit(f"{args.results} holds runs made with other settings ({', '.join(other)}): give the same "
                         f"--train-samples/--epochs/... as they had ({next(iter(other.values()))}) or another --results file")
    if not args.summary:
        a = vars(args)
        tasks = [(v, s, a) for s in args.seeds for v in args.variants]
        tasks += [(v, s, a) for s in args.ablation_seeds for v in args.ablation_variants]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for line in pool.imap_unordered(run_one, tasks):
                print(line, flush=True)
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, {args.jobs} runs in parallel x 1 torch thread, "
          f"torch {torch.__version__}; wall {time.perf_counter() - t0:.0f}s")
    print(f"Fashion-MNIST: {args.train_samples} training images (seeded subset) for pretraining and probes, 10000 test images; "
          f"resnet18 width {args.width}, cifar stem, {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; "
          f"probes {args.linear_epochs} epochs; seeds {args.seeds}")
    print(summarize(args))


if __name__ == "__main__":
    main()
