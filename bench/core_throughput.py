"""Training throughput of ``ssql`` vs ``simsiam`` on the same model and batch, in one run.

An SSQL step runs four encoder passes (FP and quantized, two views) against SimSiam's two, so
2.0x the SimSiam step time is the floor; the target is <= 2.2x. Steps alternate between the two
methods so that machine noise hits both alike; the median step time of each is reported.

    .venv/bin/python bench/core_throughput.py                      # CPU default: small model
    .venv/bin/python bench/core_throughput.py --width 1 --image-size 32 --batch-size 512 --steps 30   # GPU

On CUDA the step runs in bf16 autocast with channels_last (the trainer's defaults); on the CPU in
fp32, contiguous (``runtime.use_channels_last``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ssql_core.config import PretrainConfig
from ssql_core.methods import build_method
from ssql_core.runtime import autocast, resolve_device, to_input, use_channels_last
from ssql_core.train import build_optimizer


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    channels_last = use_channels_last(device, True)  # the trainer's policy: CUDA only
    models, opts, fns = {}, {}, {}
    for name in ("simsiam", "ssql"):
        torch.manual_seed(0)
        cfg = PretrainConfig(method=name, backbone=args.backbone, width=args.width, image_size=args.image_size,
                             batch_size=args.batch_size, dataset="synthetic", compile=args.compile).validate()
        m = build_method(cfg).to(device)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        models[name], opts[name] = m, build_optimizer(m, cfg)
        fns[name] = torch.compile(m.training_step) if args.compile else m.training_step
    g = torch.Generator().manual_seed(0)
    x1 = to_input(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g), device, channels_last)
    x2 = to_input(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g), device, channels_last)

    def step(name: str, i: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast(device, True):
            out = fns[name](x1, x2, i)
        opts[name].zero_grad(set_to_none=True)
        out.loss.float().backward()
        opts[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for i in range(args.warmup):
        for name in models:
            step(name, i)
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.steps):
        for name in models:
            times[name].append(step(name, args.warmup + i))
    med = {n: statistics.median(t) for n, t in times.items()}
    ips = {n: args.batch_size / med[n] for n in med}
    print(f"machine: {machine(device)}; torch {torch.__version__}")
    print(f"model: {args.backbone} width {args.width}, {args.image_size}px, batch {args.batch_size}, "
          f"{'bf16 autocast, ' if device.type == 'cuda' else 'fp32, '}{'channels_last' if channels_last else 'contiguous'}{', compiled' if args.compile else ''}; "
          f"{args.steps} timed steps each (median), {args.warmup} warm-up")
    for n in med:
        print(f"  {n:8s} {med[n] * 1000:9.1f} ms/step  {ips[n]:9.1f} images/s")
    print(f"  ratio ssql/simsiam step time: {med['ssql'] / med['simsiam']:.2f}x (floor 2.0x, target <= 2.2x)")


if __name__ == "__main__":
    main()
