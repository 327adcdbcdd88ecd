"""How far the cost estimate (``ssql_core.cost``) is from the time pretraining really takes.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/cost_estimate_error.py [--device cpu] [--repeats 2]

The service measures a device's sustained TFLOP/s from one job and estimates every later job
with it (decision 014). This does the same on this machine: the first configuration calibrates
(estimated FLOPs / its measured seconds), each other one is predicted from that throughput and
run; printed: predicted and measured seconds and their ratio (measured / predicted; 1 = exact),
the median of ``--repeats`` runs each, with the machine named. One JSON line per configuration,
then a summary line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"method": "ssql", "dataset": "synthetic", "epochs": 1, "batch_size": 32, "max_samples": 256, "seed": 0,
        "checkpoint_every_steps": 10_000}  # fmt: skip
#: (name, overrides): the first calibrates
CONFIGS = [
    ("resnet18 w0.125 16px", {"backbone": "resnet18", "width": 0.125, "image_size": 16}),
    ("resnet18 w0.125 32px", {"backbone": "resnet18", "width": 0.125, "image_size": 32}),
    ("resnet18 w0.25 16px", {"backbone": "resnet18", "width": 0.25, "image_size": 16}),
    ("resnet18 w0.125 16px 2 epochs", {"backbone": "resnet18", "width": 0.125, "image_size": 16, "epochs": 2}),
    ("mobilenet_v2 w0.5 32px", {"backbone": "mobilenet_v2", "width": 0.5, "image_size": 32}),
    ("resnet50 w0.125 16px", {"backbone": "resnet50", "width": 0.125, "image_size": 16}),
]


def run_seconds(cfg: dict, device: str) -> float:
    from ssql_core.config import PretrainConfig
    from ssql_core.hooks import Hooks
    from ssql_core.train import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pretrain(PretrainConfig.from_dict({**cfg, "device": device}), Path(tmp), Hooks())
        return time.perf_counter() - start


def main() -> int:
    import torch

    from ssql_core.cost import estimate
    from ssql_core.runtime import device_kind

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    machine = {"device": device_kind(args.device), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    tflops = None
    ratios = []
    for name, over in CONFIGS:
        cfg = {**BASE, **over}
        est = estimate("pretrain", cfg, 1.0)
        assert est is not None
        seconds = statistics.median(run_seconds(cfg, args.device) for _ in range(args.repeats))
        if tflops is None:
            tflops = est.pflops * 1e15 / seconds / 1e12
            print(json.dumps({"config": name, "calibration": True, "seconds": round(seconds, 3), "tflops": round(tflops, 6)}))
            continue
        predicted = est.pflops * 1e15 / (tflops * 1e12)
        ratios.append(seconds / predicted)
        print(json.dumps({"config": name, "predicted_s": round(predicted, 3), "measured_s": round(seconds, 3),
                          "measured_over_predicted": round(seconds / predicted, 3)}))  # fmt: skip
    print(json.dumps({"summary": True, "median_ratio": round(statistics.median(ratios), 3), "min_ratio": round(min(ratios), 3),
                      "max_ratio": round(max(ratios), 3), "repeats": args.repeats, **machine}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
