"""Where fine-tuning starts and ends (issue 17): one pretrain checkpoint fine-tuned at one bit-width
from a random head, from the PTQ + linear probe's head, and from the probe with a milder crop.
Prints the PTQ + linear baseline, the start, the per-epoch test top-1 and the end of each. One seed
per variant: an observation, not a measured effect.

    .venv/bin/python bench/finetune_start.py --checkpoint runs/ssql/last.pt --bits 4w4a --epochs 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ssql_core.finetune import FinetuneConfig, finetune

VARIANTS = {"random head": {"head_init": "random"}, "probe head": {"head_init": "probe"},
            "probe head, crop 0.5-1": {"head_init": "probe", "crop_scale": (0.5, 1.0)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--bits", default="4w4a")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, kw in VARIANTS.items():
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as wd:
            r = finetune(FinetuneConfig(checkpoint=args.checkpoint, bits=args.bits, epochs=args.epochs, device="cpu", **kw), wd)
        print(json.dumps({"variant": name, "ptq_linear_top1": r.get("ptq_linear_top1"), "start_top1": r["start_top1"],
                          "top1": r["top1"], "final_loss": round(r["final_loss"], 3),
                          "curve": [c["test_top1"] for c in r["curve"]], "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
