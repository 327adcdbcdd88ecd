"""Where an ONNX model's time goes: onnxruntime's own per-op profile (CPU EP, all optimisations).

Each argument is ``path.onnx@batch``; prints the mean microseconds per run spent in each op type
(the kernels of the graph onnxruntime runs after optimising), largest first.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_profile.py files/integer/classifier-4w4a.onnx@32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssql_core.export.onnx_graph import read_onnx  # noqa: E402


def profile(path: str, batch: int, runs: int, threads: int) -> tuple[float, Counter]:
    """(mean us per run over all kernels, us per run per op type)."""
    proto, manifest = read_onnx(path)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "prof")
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        size = int(manifest.get("source", {}).get("image_size") or 32)
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
        for _ in range(runs):
            sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
    return sum(per_op.values()), per_op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="path.onnx@batch")
    ap.add_argument("--runs", type=int, default=100, help="runs at batch 1 (batch b: runs / b, at least 10)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op thread(s)")
    for spec in args.models:
        path, _, b = spec.rpartition("@")
        batch = int(b)
        total, per_op = profile(path, batch, max(args.runs // batch, 10), args.threads)
        ops = ", ".join(f"{op} {us:.0f}" for op, us in per_op.most_common())
        print(f"{path} batch {batch}: {total:.0f} us per run in kernels; {ops}")


if __name__ == "__main__":
    main()
