"""Speed only: the ONNX forms of a random-init ResNet at a chosen width and image size, vs FP32.

:mod:`bench.inference` measures a trained Fashion-MNIST backbone (width 0.25, 16 px), where every
convolution is tiny and per-op overhead dominates. This measures the same forms on a larger
network without training one: a random-init backbone whose BN statistics and activation ranges
are calibrated on noise (``tests/core/test_export_roundtrip.calibrated``). Speed does not depend on
the weights' values, accuracy does, so no accuracy is reported. onnxruntime CPU EP, all graph
optimisations, ``--threads`` intra-op threads; sessions timed in ``--rounds`` interleaved rounds
(median per round), ratios are the median of the per-round FP32 / form time ratios.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_forms_speed.py --width 1.0 --image-size 32 --bits 8w8a,4w4a
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssql_core.export.onnx_graph import FORMS, build_onnx  # noqa: E402
from ssql_core.export.quantized import quantize_backbone  # noqa: E402
from ssql_core.runtime import cpu_name  # noqa: E402
from tests.core.test_export_roundtrip import calibrated  # noqa: E402


def session(proto: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--bits", default="8w8a,4w4a")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=10, help="runs per session per round (batch 1; fewer for larger batches)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = calibrated(args.width, seed=0, size=args.image_size, name=args.arch)
    sessions = {"fp/fp32": session(build_onnx(quantize_backbone(bb, "fp")).SerializeToString(), args.threads)}
    for bits in args.bits.split(","):
        q = quantize_backbone(bb, bits)
        for form in args.forms.split(","):
            sessions[f"{bits}/{form}"] = session(build_onnx(q, form=form).SerializeToString(), args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in sessions}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, args.image_size, args.image_size), dtype=np.float32)
        for s in sessions.values():
            for _ in range(3):
                s.run(None, {"input": x})
        for _ in range(args.rounds):
            for key, s in sessions.items():
                runs = []
                for _ in range(max(args.runs // b, 3)):
                    t0 = time.perf_counter()
                    s.run(None, {"input": x})
                    runs.append(time.perf_counter() - t0)
                times[key][b].append(statistics.median(runs))
    print(f"machine: {cpu_name()}, {args.threads} intra-op thread(s), onnxruntime {ort.__version__}; {args.arch} width {args.width} "
          f"at {args.image_size} px, random init calibrated on noise; {args.rounds} interleaved rounds")
    for key in sessions:
        cells = []
        for b in batches:
            t = statistics.median(times[key][b])
            ratio = statistics.median(f / q for f, q in zip(times["fp/fp32"][b], times[key][b], strict=True))
            cells.append(f"b{b} {1e3 * t:8.2f} ms {b / t:7.1f} img/s x{ratio:.2f}")
        print(f"{key:>14}  " + "   ".join(cells))


if __name__ == "__main__":
    main()
