"""GPU throughput of the real job: SSQL vs SimSiam steps, the device input pipeline, a full epoch.

ResNet-18 (CIFAR stem), 32 px, batch 512, bf16 autocast, channels_last (the trainer's CUDA
defaults), measured in one run so that the ssql/simsiam ratio compares like with like:

* step images/s of ``simsiam`` and ``ssql``, eager and ``torch.compile``-d (``runtime.compile_modules``:
  one graph per quant mode, no recompilation per bit pair), steps alternating between methods,
  median of ``--steps`` after ``--warmup``; peak GPU memory of each;
* the input pipeline alone (``device_views.DeviceViews``: two views of a 512-image batch from
  50 000 CIFAR-shaped uint8 images held on the GPU);
* a full epoch of the trainer's own loop (``train._Trainer.run``, sync-free, with its epoch-end
  checkpoint) over 50 000 CIFAR-shaped uint8 images, augmentation included: the second epoch is
  timed (the first one warms up, and compiles with ``--compile``).

Targets (issue 9): ssql/simsiam <= 2.1x; a full SSQL epoch <= 4 s on an H100; the input pipeline
at least 5x faster than the step it feeds. On a machine without CUDA it refuses (exit 2): CPU
numbers are ``bench/core_throughput.py``'s.

    .venv/bin/python bench/gpu_throughput.py                       # everything, eager and compiled
    .venv/bin/python bench/gpu_throughput.py --no-compile --json /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ssql_core.config import PretrainConfig
from ssql_core.device_views import DeviceViews
from ssql_core.hooks import Hooks
from ssql_core.methods import build_method
from ssql_core.runtime import autocast, compile_modules, to_input, use_channels_last
from ssql_core.train import _Trainer, build_optimizer

N_IMAGES = 50_000
#: the device measured (a test may point it at the CPU to smoke-test this script's logic)
DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def _cfg(method: str, args: argparse.Namespace, compiled: bool, epochs: int = 1) -> PretrainConfig:
    return PretrainConfig(method=method, backbone="resnet18", width=args.width, image_size=32, batch_size=args.batch_size,
                          dataset="synthetic", device=str(DEVICE), amp=True, channels_last=True, compile=compiled,
                          epochs=epochs, checkpoint_every_steps=10**9, input_pipeline="device").validate()


def bench_steps(args: argparse.Namespace, compiled: bool, views: DeviceViews) -> dict[str, Any]:
    """Median step time of simsiam and ssql on real augmented views, steps alternating."""
    dev = DEVICE
    models, opts = {}, {}
    for name in ("simsiam", "ssql"):
        torch.manual_seed(0)
        m = build_method(_cfg(name, args, compiled)).to(dev)
        if use_channels_last(dev, True):  # the trainer's policy: never on the CPU (runtime.py)
            m = m.to(memory_format=torch.channels_last)
        if compiled:
            compile_modules(m)
        models[name], opts[name] = m, build_optimizer(m, _cfg(name, args, compiled))
    idx = torch.randperm(len(views), device=dev)[: args.batch_size]
    x1, x2 = (to_input(x, dev, use_channels_last(dev, True)) for x in views.views(0, 0, idx))
    peak: dict[str, int] = {}

    def step(name: str, i: int) -> float:
        _sync()
        t = time.perf_counter()
        with autocast(dev, True):
            out = models[name].training_step(x1, x2, i)
        opts[name].zero_grad(set_to_none=True)
        out.loss.float().backward()
        opts[name].step()
        _sync()
        return time.perf_counter() - t

    for name in models:  # warm-up (and compilation) per method, with its peak memory
        _reset_peak()
        for i in range(args.warmup):
            step(name, i)
        peak[name] = _peak()
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.steps):
        for name in models:
            times[name].append(step(name, args.warmup + i))
    med = {n: statistics.median(t) for n, t in times.items()}
    return {
        n: {"ms_per_step": med[n] * 1e3, "images_per_s": args.batch_size / med[n], "peak_gib": peak[n] / 2**30}
        for n in med
    } | {"ratio_ssql_simsiam": med["ssql"] / med["simsiam"]}


def bench_pipeline(args: argparse.Namespace, views: DeviceViews) -> dict[str, Any]:
    dev = DEVICE
    perm = torch.randperm(len(views), device=dev)
    bs = args.batch_size
    for b in range(3):
        views.views(0, b, perm[b * bs:(b + 1) * bs])
    _sync()
    steps = len(views) // bs
    t = time.perf_counter()
    for b in range(steps):
        views.views(1, b, perm[b * bs:(b + 1) * bs])
    _sync()
    dt = (time.perf_counter() - t) / steps
    return {"ms_per_batch": dt * 1e3, "images_per_s": bs / dt, "batches": steps}


class _EpochClock(Hooks):
    every_n_steps = 50  # progress (one host read of the loss) every 50 steps, as a real job might

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:  # at every epoch end
        _sync()
        self.ends.append(time.perf_counter())


def bench_epoch(args: argparse.Namespace, method: str, compiled: bool, images: torch.Tensor) -> dict[str, Any]:
    """The trainer's loop over ``images`` (its device pipeline swapped in for a 50 000-image set)."""
    cfg = _cfg(method, args, compiled, epochs=2)
    with tempfile.TemporaryDirectory() as wd:
        clock = _EpochClock()
        trainer = _Trainer(cfg, Path(wd), clock)
        trainer.views = DeviceViews(images, 32, "cifar10", cfg.seed, trainer.device)
        trainer.n = len(images)
        trainer.steps_per_epoch = len(images) // cfg.batch_size
        trainer.total_steps = trainer.steps_per_epoch * cfg.epochs
        _reset_peak()
        _sync()
        t0 = time.perf_counter()
        summary = trainer.run()
        first, second = clock.ends[0] - t0, clock.ends[1] - clock.ends[0]
    return {"first_epoch_s": first, "epoch_s": second, "steps_per_epoch": trainer.steps_per_epoch,
            "images_per_s": trainer.steps_per_epoch * cfg.batch_size / second,
            "peak_gib": _peak() / 2**30, "final_loss": summary["final_loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only (skip the torch.compile runs)")
    ap.add_argument("--no-epoch", action="store_true", help="skip the full-epoch runs")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)  # smaller: a smoke test
    ap.add_argument("--images", type=int, default=N_IMAGES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: CUDA is not available on this machine; this benchmark measures GPU throughput only "
              "and refuses to run on the CPU (use bench/core_throughput.py there)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dev = DEVICE
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)  # CIFAR-shaped
    views = DeviceViews(images, 32, "cifar10", seed=0, device=dev)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)", "torch": torch.__version__,
                           "batch_size": args.batch_size, "model": "resnet18, cifar stem, 32 px, bf16, channels_last"}
    out["pipeline"] = bench_pipeline(args, views)
    variants = [False] if args.no_compile else [False, True]
    for compiled in variants:
        key = "compiled" if compiled else "eager"
        out[f"steps_{key}"] = bench_steps(args, compiled, views)
        if not args.no_epoch:
            out[f"epoch_{key}"] = {m: bench_epoch(args, m, compiled, images) for m in ("simsiam", "ssql")}
    print(f"machine: {out['device']}; torch {out['torch']}; {out['model']}; batch {args.batch_size}")
    p = out["pipeline"]
    print(f"input pipeline alone: {p['ms_per_batch']:.2f} ms per batch of {args.batch_size} (two views), "
          f"{p['images_per_s']:.0f} images/s")
    for compiled in variants:
        key = "compiled" if compiled else "eager"
        s = out[f"steps_{key}"]
        for m in ("simsiam", "ssql"):
            print(f"  {key:8s} {m:8s} {s[m]['ms_per_step']:8.2f} ms/step {s[m]['images_per_s']:9.0f} images/s  "
                  f"peak {s[m]['peak_gib']:.2f} GiB")
        ratio = s["ratio_ssql_simsiam"]
        print(f"  {key:8s} ratio ssql/simsiam {ratio:.2f}x (target <= 2.1x: {'met' if ratio <= 2.1 else 'NOT met'}); "
              f"pipeline vs ssql step {s['ssql']['ms_per_step'] / p['ms_per_batch']:.1f}x faster (target >= 5x)")
        if f"epoch_{key}" in out:
            for m, e in out[f"epoch_{key}"].items():
                print(f"  {key:8s} full epoch {m:8s} {e['epoch_s']:6.2f} s ({e['steps_per_epoch']} steps, {e['images_per_s']:.0f} "
                      f"images/s incl. augmentation; first epoch {e['first_epoch_s']:.1f} s; peak {e['peak_gib']:.2f} GiB)"
                      + (f"; target <= 4 s on an H100: {'met' if e['epoch_s'] <= 4 else 'NOT met'}" if m == "ssql" else ""))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
