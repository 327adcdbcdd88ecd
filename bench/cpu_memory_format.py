"""What contiguous memory costs an SSQL step on the CPU, against channels_last, in one run.

The trainer uses channels_last only on CUDA (``ssql_core.runtime.use_channels_last``): on the CPU
PyTorch's NHWC kernels crashed with heap corruption on an AMD EPYC machine. This measures the
price of that choice on the machine it runs on (only run it where channels_last is known not to
crash). Steps of the two layouts alternate so machine noise hits both alike; medians are reported.

    .venv/bin/python bench/cpu_memory_format.py --threads 1 --width 0.25 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from ssql_core.config import PretrainConfig
from ssql_core.methods import build_method
from ssql_core.train import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ssql")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    models, opts = {}, {}
    for name, fmt in layouts.items():
        torch.manual_seed(0)
        cfg = PretrainConfig(method=args.method, width=args.width, image_size=args.image_size, batch_size=args.batch_size,
                             dataset="synthetic").validate()
        models[name] = build_method(cfg).to(memory_format=fmt)
        opts[name] = build_optimizer(models[name], cfg)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g) for _ in range(2)]
    inputs = {n: [t.contiguous(memory_format=f) for t in x] for n, f in layouts.items()}

    def step(name: str, i: int) -> float:
        t = time.perf_counter()
        out = models[name].training_step(*inputs[name], i)
        opts[name].zero_grad(set_to_none=True)
        out.loss.backward()
        opts[name].step()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {n: [] for n in layouts}
    for i in range(args.warmup + args.steps):
        for n in layouts:
            dt = step(n, i)
            if i >= args.warmup:
                times[n].append(dt)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"machine: {platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch threads; torch {torch.__version__}")
    print(f"{args.method} resnet18 width {args.width}, {args.image_size}px, batch {args.batch_size}, fp32; {args.steps} timed steps each (median)")
    for n in layouts:
        print(f"  {n:14s} {med[n] * 1000:9.1f} ms/step")
    print(f"  ratio contiguous/channels_last: {med['contiguous'] / med['channels_last']:.3f}x (above 1 = contiguous slower)")


if __name__ == "__main__":
    main()
