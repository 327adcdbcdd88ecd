"""Top-1 against model size for one backbone: uniform weight bits, autobit allocations, PTQ methods.

One SSQL pretrain on Fashion-MNIST (a seeded subset, small width, CPU), then on the full test
split, with the activations at one fixed width (``--a-bits``) everywhere:

* uniform weight bits ``--uniform`` (8/6/4/3/2) with PTQ by calibration (MSE ranges, BN probe:
  our evaluation defaults);
* autobit (:mod:`ssql_core.mixed_precision.autobit`) at each ``--budgets`` average weight bits, for both
  sensitivities (``hessian``: Hutchinson trace of the FP probe's cross-entropy x perturbation;
  ``quant_error``: features' MSE with one layer quantized) and both solvers (``milp``, ``greedy``);
  the sensitivities are measured once and every allocation is evaluated as a per-layer map;
* ``--ptq-bits`` uniform bit-widths again with AdaRound (``--ptq-iters`` per layer) against the
  calibration-only rows above.

Every row is one evaluation (calibration, features, probe) of the same frozen backbone; ``KB``
is the packed file's tensors (``model_bytes``). One pretrain seed: differences of a point or two
between rows are within what another seed or probe run moves (see docs/RESULTS.md on the
Fashion-MNIST seed spread).

    nice -n 10 .venv/bin/python bench/pareto.py --out runs/pareto --json docs/results/pareto.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssql_core.bitconfig import layer_table
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.data import Transformed, load_split, test_transform
from ssql_core.evaluate import calibration_images, evaluate
from ssql_core.mixed_precision.autobit import AutobitConfig, allocate, costs_for
from ssql_core.qnn import bind_context
from ssql_core.runtime import cpu_name
from ssql_core.train import load_pretrained, pretrain


def eval_cfg(args: argparse.Namespace, checkpoint: Path, bits: list[Any], **extra: Any) -> EvalConfig:
    return EvalConfig(checkpoint=str(checkpoint), bits=bits, epochs=args.linear_epochs, batch_size=256,
                      max_samples=args.probe_samples, seed=0, device="cpu", **extra)


def sensitivities(args: argparse.Namespace, checkpoint: Path, fp_head: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each measure's costs, measured once (the allocations for every budget and solver reuse them)."""
    pcfg, method = load_pretrained(str(checkpoint))
    backbone = method.backbone.eval()
    ctx = bind_context(backbone)
    split = load_split(pcfg.dataset, True, pcfg.image_size, None, False, args.probe_samples, 0)
    plain = Transformed(split.data, test_transform(pcfg.image_size, split.stats_key))
    images = calibration_images(plain, args.sens_images, 0, 256)
    head = nn.Linear(fp_head["weight"].shape[1], fp_head["weight"].shape[0])
    head.load_state_dict(fp_head)
    out = {"table": layer_table(backbone, pcfg.image_size)}
    for sens in ("hessian", "quant_error"):
        cfg = AutobitConfig(budget_bits=8.0, sensitivity=sens, a_bits=args.a_bits, images=args.sens_images, samples=args.samples)
        t0 = time.perf_counter()
        costs, _ = costs_for(cfg.validate(), backbone, ctx, images, torch.device("cpu"), head, pcfg.rounding or "reciprocal", 0)
        out[sens] = {"costs": costs, "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/pareto")
    ap.add_argument("--json", default=None, help="write every row (and the run's settings) here")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--train-samples", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--probe-samples", type=int, default=4000, help="training images of the probe (and calibration, sensitivity)")
    ap.add_argument("--linear-epochs", type=int, default=30)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--uniform", type=int, nargs="+", default=[8, 6, 4, 3, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--sens-images", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16, help="Hutchinson vectors")
    ap.add_argument("--ptq-bits", type=int, nargs="*", default=[4, 3, 2])
    ap.add_argument("--ptq-iters", type=int, default=300)
    ap.add_argument("--ptq-images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t_start = time.perf_counter()
    ckpt = out / "pretrain" / "last.pt"
    t0 = time.perf_counter()
    if not ckpt.is_file():
        pretrain(PretrainConfig(method="ssql", dataset=args.dataset, epochs=args.epochs, batch_size=128, lr=0.05, seed=0,
                                image_size=args.image_size, width=args.width, stem="cifar", max_samples=args.train_samples,
                                checkpoint_every_steps=10**6, device="cpu"), out / "pretrain")
    pretrain_s = time.perf_counter() - t0
    a = args.a_bits
    rows: list[dict[str, Any]] = []

    def run(name: str, bits: list[Any], workdir: Path, **extra: Any) -> list[dict[str, Any]]:
        t = time.perf_counter()
        got = evaluate(eval_cfg(args, ckpt, bits, **extra), workdir)
        print(f"{name}: {len(got)} rows in {time.perf_counter() - t:.0f} s", flush=True)
        return got

    uniform = run("uniform", ["fp", *[f"{w}w{a}a" for w in args.uniform]], out / "uniform")
    for r in uniform:
        r["kind"] = "uniform"
    rows += uniform
    heads = torch.load(out / "uniform" / "heads.pt", weights_only=True)
    sens = sensitivities(args, ckpt, heads["heads"]["fp"])
    table = sens["table"]
    maps: list[dict[str, str]] = []
    meta: list[dict[str, Any]] = []
    for budget in args.budgets:
        for measure in ("hessian", "quant_error"):
            for solver in ("milp", "greedy"):
                cfg = AutobitConfig(budget_bits=budget, sensitivity=measure, solver=solver, a_bits=a).validate()
                config, alloc = allocate(table, cfg, sens[measure]["costs"])
                maps.append(config.as_dict())
                meta.append({"kind": "autobit", "budget_bits": budget, "sensitivity": measure, "solver": solver,
                             "objective": alloc.objective, "solve_seconds": round(alloc.seconds, 4),
                             "sensitivity_seconds": round(sens[measure]["seconds"], 2), "label": config.label})
    unique = list({json.dumps(m, sort_keys=True): m for m in maps}.values())
    auto = {r["bits"]: r for r in run(f"autobit ({len(unique)} distinct maps)", unique, out / "autobit")}
    for m in meta:
        rows.append({**auto[m["label"]], **m})
    if args.ptq_bits:
        ada = run("adaround", [f"{w}w{a}a" for w in args.ptq_bits], out / "adaround", ptq="adaround",
                  ptq_iters=args.ptq_iters, ptq_images=args.ptq_images)
        for r in ada:
            r["kind"] = "uniform"
        rows += ada
    total = time.perf_counter() - t_start
    print(f"\nmachine: {cpu_name()}, {args.threads} torch thread(s); pretrain {pretrain_s:.0f} s, total {total:.0f} s")
    print("| kind | bits | PTQ | sensitivity | solver | avg w bits | KB | top-1 % |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['bits'] if r['kind'] == 'uniform' else 'budget ' + format(r['budget_bits'], 'g')} | {r['ptq']} | "
              f"{r.get('sensitivity', '-')} | {r.get('solver', '-')} | {r['weight_bits_avg']:.2f} | {r['model_bytes'] / 1000:.1f} | "
              f"{r['top1']:.2f} |")
    for measure in ("hessian", "quant_error"):
        print(f"{measure}: sensitivity {sens[measure]['seconds']:.1f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k not in ("loss_curve", "autobit")} for r in rows]
        Path(args.json).write_text(json.dumps({"settings": vars(args), "machine": cpu_name(), "pretrain_seconds": pretrain_s,
                                               "total_seconds": total, "rows": slim}, indent=1))


if __name__ == "__main__":
    main()
