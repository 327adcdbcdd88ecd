"""The paper's claim on Fashion-MNIST: does SSQL keep its accuracy at low bit-widths where SimSiam
loses it? SSQL vs SimSiam (and a randomly initialised backbone), several seeds, paired statistics.

Every run (variant, seed) pretrains on a seeded subset of the 60 000 training images, then is
evaluated at the paper's eight bit-widths on the full 10 000-image test split by three probes on
the same frozen features: the paper's linear protocol (SGD lr 30, momentum 0.9, 100 epochs, steps
at 60/80 %), a converged one (a parameter-free BatchNorm before the linear layer, lr chosen at fp
on a held-out 20 % of the training subset), and kNN (k=200, T=0.1). Calibration: min-max on 128
test-transformed training images (SPEC 6). Ablations on the main checkpoints: calibration methods,
1024 calibration images, ranges recorded with quantized weights; and on extra pretrains: SSQL with
``preset="reference"`` and with weights 4..8 bits. Per point, the share of non-zero activations
rounded to zero at 4 bits and the activation inflation by 2-bit weights.

    .venv/bin/python bench/fmnist_repro.py --seeds 0 1 2 --jobs 2 --out runs/fmnist_repro

Runs are resumable (a finished run's JSON is reused). ``--summary`` prints the tables from the
JSON files only (give it the run's own arguments: its header line repeats them). Numbers and the machine go to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
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
from ssql_core.train import load_pretrained, pretrain

BITS = ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a"]
ABL_BITS = ["4w4a", "3w3a", "2w4a"]
BN_LRS = [0.03, 0.1, 0.3, 1.0]


def pcfg_for(args: argparse.Namespace, method: str, seed: int, **extra: Any) -> PretrainConfig:
    return PretrainConfig(method=method, dataset="fashion_mnist", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=seed, image_size=args.image_size, width=args.width, stem="cifar", max_samples=args.train_samples,
                          checkpoint_every_steps=10**6, device="cpu", **extra)


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

    def calibrate(self, bits: str, calibration: str = "minmax", images: int = 128, quantized_weights: bool = False) -> None:
        if parse_bits(bits).is_fp:
            return
        loader = calibration_set(calibration, self.train.data, self.train_plain, self.pcfg.image_size, self.train.stats_key,
                                 images, self.seed)
        calibrate_ranges(self.backbone, self.ctx, loader, self.device, bits, calibration, 99.99, quantized_weights, self.seed)

    def features(self, bits: str) -> tuple[torch.Tensor, ...]:
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


def run_one(task: tuple[str, int, dict[str, Any]]) -> str:
    variant, seed, a = task
    args = argparse.Namespace(**a)
    torch.set_num_threads(1)
    out = Path(args.out) / f"{variant}_s{seed}"
    result_path = out / "result.json"
    if result_path.exists():
        return f"{variant} s{seed}: reused"
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
                           "final_z_std": summary.get("final_z_std"), "bn_lr": bn_lr, "bn_lr_heldout": lr_scores, "bits": {}}
    for b in BITS:
        ev.calibrate(b)
        res["bits"][b] = ev.all_probes(b, bn_lr)
    if variant in ("simsiam", "ssql"):
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
    return f"{variant} s{seed}: pretrain {t1 - t0:.0f}s, eval {res['eval_s']:.0f}s, " + " ".join(
        f"{b}={res['bits'][b]['bn']:.1f}" for b in BITS)


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b and its 95 % t-interval over pairs (same seed)."""
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def summarize(out: Path, seeds: list[int]) -> str:
    res: dict[str, dict[int, dict[str, Any]]] = {}
    for p in sorted(out.glob("*_s*/result.json")):
        r = json.loads(p.read_text())
        if r["seed"] in seeds:
            res.setdefault(r["variant"], {})[r["seed"]] = r
    lines: list[str] = []

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else (f"{v[0]:.1f}" if v else "-")

    for probe, title in (("linear", "paper's linear probe (lr 30)"), ("bn", "BN + linear probe (lr from held-out fp)"), ("knn", "kNN k=200")):
        lines += [f"\n**{title}**: top-1 % mean ± std over seeds\n", "| variant | n | " + " | ".join(BITS) + " |",
                  "|---|---|" + "---|" * len(BITS)]
        for variant, by_seed in res.items():
            cells = [ms([by_seed[s]["bits"][b][probe] for s in by_seed]) for b in BITS]
            lines.append(f"| {variant} | {len(by_seed)} | " + " | ".join(cells) + " |")
        if "ssql" in res and "simsiam" in res:
            common = sorted(set(res["ssql"]) & set(res["simsiam"]))
            cells = []
            for b in BITS:
                m, lo, hi = paired_ci([res["ssql"][s]["bits"][b][probe] for s in common], [res["simsiam"][s]["bits"][b][probe] for s in common])
                held = "**held**" if lo > 0 else ("reversed" if hi < 0 else "n.s.")
                cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] {held}")
            lines.append(f"| SSQL - SimSiam (paired, 95% CI, n={len(common)}) | | " + " | ".join(cells) + " |")
        for base in ("ssql", "simsiam"):
            if base in res and "random" in res:
                common = sorted(set(res[base]) & set(res["random"]))
                cells = []
                for b in BITS:
                    m, lo, hi = paired_ci([res[base][s]["bits"][b][probe] for s in common], [res["random"][s]["bits"][b][probe] for s in common])
                    cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]")
                lines.append(f"| {base} - random init (paired, n={len(common)}) | | " + " | ".join(cells) + " |")
    for variant in ("simsiam", "ssql"):
        if variant not in res:
            continue
        by_seed = res[variant]
        lines += [f"\n**Ablations on {variant}** (mean over seeds; linear lr 30 / BN probe)\n",
                  "| calibration | " + " | ".join(ABL_BITS) + " |", "|---|" + "---|" * len(ABL_BITS)]
        base = {b: (statistics.mean(by_seed[s]["bits"][b]["linear"] for s in by_seed), statistics.mean(by_seed[s]["bits"][b]["bn"] for s in by_seed)) for b in ABL_BITS}
        lines.append("| minmax, 128 images (SPEC 6) | " + " | ".join(f"{base[b][0]:.1f} / {base[b][1]:.1f}" for b in ABL_BITS) + " |")
        for name in next(iter(by_seed.values())).get("ablations", {}):
            cells = []
            for b in ABL_BITS:
                lin = statistics.mean(by_seed[s]["ablations"][name][b]["linear"] for s in by_seed)
                bn = statistics.mean(by_seed[s]["ablations"][name][b]["bn"] for s in by_seed)
                cells.append(f"{lin:.1f} / {bn:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        stats0 = [by_seed[s]["activation_stats"] for s in by_seed]
        lines += [f"\n**Activation points of {variant}** (mean over seeds): share of non-zero FP activations that the 4w4a grid "
                  "rounds to zero; mean |activation| with 2-bit weights over FP (2w4a)\n", "| point | zeroed at 4w4a | inflation at 2w4a |", "|---|---|---|"]
        for point in stats0[0]["4w4a"]:
            z = statistics.mean(st["4w4a"][point]["nonzero_to_zero"] for st in stats0)
            inf = statistics.mean(st["2w4a"][point]["inflation"] for st in stats0)
            lines.append(f"| {point} | {100 * z:.0f}% | {inf:.2f}x |")
    for variant in ("ssql_reference", "ssql_w4"):
        if variant in res and "ssql" in res:
            common = sorted(set(res[variant]) & set(res["ssql"]))
            lines += [f"\n**{variant} vs ssql** (BN probe, paired over seeds {common})\n", "| | " + " | ".join(BITS) + " |", "|---|" + "---|" * len(BITS)]
            lines.append(f"| {variant} | " + " | ".join(ms([res[variant][s]["bits"][b]["bn"] for s in common]) for b in BITS) + " |")
            lines.append("| ssql | " + " | ".join(ms([res["ssql"][s]["bits"][b]["bn"] for s in common]) for b in BITS) + " |")
            lines.append("| difference | " + " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(*paired_ci(
                [res[variant][s]["bits"][b]["bn"] for s in common], [res["ssql"][s]["bits"][b]["bn"] for s in common])) for b in BITS) + " |")
    curves = [(v, s, r["bits"]["fp"]) for v, by in res.items() for s, r in by.items()][:2]
    for v, s, r in curves:
        lines.append(f"\nprobe loss at fp, {v} seed {s}, per epoch (every 10th): paper lr 30: "
                     f"{r['linear_loss_curve'][::10]} ; BN probe: {r['bn_loss_curve'][::10]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["simsiam", "ssql", "random"])
    ap.add_argument("--ablation-variants", nargs="*", default=["ssql_reference", "ssql_w4"])
    ap.add_argument("--ablation-seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--linear-epochs", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs, one torch thread each")
    ap.add_argument("--out", default="runs/fmnist_repro")
    ap.add_argument("--summary", action="store_true", help="only print the tables from finished runs")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    if not args.summary:
        a = vars(args)
        tasks = [(v, s, a) for s in args.seeds for v in args.variants]
        tasks += [(v, s, a) for s in args.ablation_seeds for v in args.ablation_variants]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for line in pool.imap_unordered(run_one, tasks):
                print(line, flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs in parallel x 1 torch thread, "
          f"torch {torch.__version__}; wall {time.perf_counter() - t0:.0f}s")
    print(f"Fashion-MNIST: {args.train_samples} training images (seeded subset) for pretraining and probes, 10000 test images; "
          f"resnet18 width {args.width}, cifar stem, {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; "
          f"probes {args.linear_epochs} epochs; seeds {args.seeds}")
    print(summarize(out, args.seeds))


if __name__ == "__main__":
    main()
