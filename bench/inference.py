"""Measured inference per bit-width: the exported ONNX classifiers in onnxruntime (CPU EP).

For one pretrain run and an evaluation's linear heads (``--heads``, or a short linear evaluation
run here), every bit-width is exported as the packed safetensors classifier and as its ONNX graph
in each ``--forms`` (:data:`ssql_core.export.onnx_graph.FORMS`: ``integer`` ConvInteger on the
codes, ``qlinear`` QLinearConv where the graph allows, ``storage`` plain QDQ). Then, in one process
on one machine:

* latency at batch 1 and throughput at batch 32, onnxruntime's CPU execution provider with all
  graph optimisations (the QDQ fusions into QLinearConv happen here), ``--threads`` intra-op
  threads. The sessions are timed in ``--rounds`` interleaved rounds (each the median of
  ``--repeats / rounds`` runs), so background load on a shared machine hits every model alike;
  the time is the median over rounds and the ratio against the FP32 ONNX model of the same
  backbone the median of the per-round ratios;
* which kernels the optimised graph runs: integer (QLinearConv, ConvInteger, MatMulInteger,
  QLinearMatMul) or float Conv after DequantizeLinear (weights then only shrink storage), read
  from the graph onnxruntime writes after optimising;
* size on disk of the ONNX file and the packed file;
* top-1 on the same test images of the ONNX model (optimised session) and of the PyTorch packed
  model (``load_quantized``), with the share of images where their predictions differ; the issue
  requires |difference| <= 0.1 point, and the row says whether it holds. As a control, the share of
  images where the PyTorch model run channels-last (another conv summation order) predicts
  differently from itself run contiguous: the model's own sensitivity to ulp-level differences,
  which flip activation codes on rounding boundaries (docs/decisions/004, section 5).

    .venv/bin/python bench/inference.py --checkpoint runs/fmnist8/ssql_s0/last.pt \\
        --bits fp,8w8a,6w6a,4w4a,2w4a --forms integer,qlinear,storage --test-images 2000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.data import DataLoader, Subset

from ssql_core import data as ssql_data
from ssql_core.config import EvalConfig
from ssql_core.evaluate import evaluate
from ssql_core.export import export_checkpoints, load_quantized
from ssql_core.export.onnx_graph import FORMS, read_onnx
from ssql_core.runtime import cpu_name
from ssql_core.train import load_pretrained

INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul")


def session(proto: onnx.ModelProto, threads: int, optimized_path: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the optimised-model file's "hardware specific" warning
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def kernels(optimized: Path) -> dict[str, Any]:
    """Op counts of the graph onnxruntime runs after its optimisations."""
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    return {"integer_ops": integer, "float_conv": ops.get("Conv", 0) + ops.get("FusedConv", 0),
            "dequantize": ops.get("DequantizeLinear", 0), "quantize": ops.get("QuantizeLinear", 0),
            "batchnorm": ops.get("BatchNormalization", 0), "ops": len(list(ops.elements()))}


def timed_rounds(sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeats: int, rounds: int,
                 warmup: int = 5) -> dict[str, list[float]]:
    """Per session, the median seconds of one ``run`` on ``x`` in each of ``rounds`` interleaved rounds."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, {"input": x})
    per = max(repeats // rounds, 3)
    out: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            times = []
            for _ in range(per):
                t0 = time.perf_counter()
                sess.run(None, {"input": x})
                times.append(time.perf_counter() - t0)
            out[key].append(statistics.median(times))
    return out


def test_images(dataset: str, image_size: int, n: int, row: dict[str, Any], data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of a seeded permutation of the test split, with the evaluation's test transform."""
    split = ssql_data.load_split(dataset, False, image_size, data_root)
    stats_key = split.stats_key
    if hasattr(ssql_data, "stats_key_for"):
        stats_key = ssql_data.stats_key_for(stats_key, row.get("normalization"))
    try:
        tf = ssql_data.test_transform(image_size, stats_key, row.get("interpolation") or "bilinear")
    except TypeError:  # a test_transform without the interpolation argument
        tf = ssql_data.test_transform(image_size, stats_key)
    ds = ssql_data.Transformed(split.data, tf)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    xs, ys = [], []
    for x, y in DataLoader(Subset(ds, idx), batch_size=256):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs).float(), torch.cat(ys)


def torch_predictions(st_path: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch packed model's predictions, contiguous and (control) channels-last."""
    model = load_quantized(st_path)
    with torch.no_grad():
        pt_pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
        # control: the same PyTorch model with another conv summation order (channels-last)
        nhwc = model.to(memory_format=torch.channels_last)
        pt_nhwc = torch.cat([nhwc(x[i:i + 256].contiguous(memory_format=torch.channels_last)).argmax(1) for i in range(0, len(x), 256)])
    return pt_pred, pt_nhwc


def onnx_row(bits: str, form: str, onnx_path: Path, st_path: Path, preds: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], ort.InferenceSession]:
    """Everything but the timings for one file; returns the row and its optimised session."""
    proto, manifest = read_onnx(onnx_path)
    optimized = work / f"{bits}-{form}.optimized.onnx"
    sess = session(proto, args.threads, optimized)
    ort_logits = np.concatenate([sess.run(None, {"input": x[i:i + 256].numpy()})[0] for i in range(0, len(x), 256)])
    ort_pred = torch.from_numpy(ort_logits).argmax(1)
    pt_pred, pt_nhwc = preds
    top1_ort = 100.0 * float((ort_pred == y).float().mean())
    top1_pt = 100.0 * float((pt_pred == y).float().mean())
    planned = Counter(c["kernel"] for c in manifest.get("integer_convs", {}).values())
    return {"bits": bits, "form": form, "onnx_bytes": onnx_path.stat().st_size, "packed_bytes": st_path.stat().st_size,
            "top1_onnx": top1_ort, "top1_torch": top1_pt, "top1_diff": top1_ort - top1_pt,
            "pred_disagree": 100.0 * float((ort_pred != pt_pred).float().mean()),
            "torch_nhwc_disagree": 100.0 * float((pt_nhwc != pt_pred).float().mean()),
            "top1_within_0.1": abs(top1_ort - top1_pt) <= 0.1, "manifest_integer_convs": dict(planned), **kernels(optimized)}, sess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a pretrain run's last.pt")
    ap.add_argument("--heads", help="an evaluation's heads.pt of that run (default: a short linear evaluation here)")
    ap.add_argument("--bits", default="fp,8w8a,6w6a,4w4a,2w4a")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forms", default=",".join(FORMS), help="ONNX forms to export and measure")
    ap.add_argument("--repeats", type=int, default=100, help="batch-1 runs per session (a quarter at batch 32)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--train-images", type=int, default=4000, help="linear evaluation's training subset (no --heads)")
    ap.add_argument("--probe-epochs", type=int, default=20)
    ap.add_argument("--ptq", default="calibrate", help="the evaluation's ptq (no --heads): calibrate, adaround, brecq")
    ap.add_argument("--data-root")
    ap.add_argument("--out", help="keep the files here (default: a temporary folder)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bits = [b for b in args.bits.split(",") if b]
    if "fp" not in bits:
        bits = ["fp", *bits]  # the FP32 baseline of the ratios
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # one snapshot of the weights for every step (a run still training rewrites its last.pt)
        checkpoint = str(shutil.copy2(args.checkpoint, work / "last.pt"))
        pcfg, _ = load_pretrained(checkpoint)
        heads = Path(args.heads) if args.heads else None
        if heads is None:
            t0 = time.perf_counter()
            evaluate(EvalConfig(checkpoint=checkpoint, bits=bits, epochs=args.probe_epochs, max_samples=args.train_images,
                                device="cpu", data_root=args.data_root, ptq=args.ptq), work / "eval")
            heads = work / "eval" / "heads.pt"
            print(f"linear evaluation for the heads: {time.perf_counter() - t0:.0f} s")
        state = torch.load(heads, weights_only=True)
        eval_rows = {r["bits"]: r for r in state["rows"]}
        st = export_checkpoints(checkpoint, bits, work / "files", heads=heads)
        forms = [f for f in args.forms.split(",") if f]
        ox = {f: export_checkpoints(checkpoint, bits, work / "files" / f, fmt="onnx", heads=heads, onnx_form=f) for f in forms}
        x, y = test_images(state["config"].get("dataset") or pcfg.dataset, pcfg.image_size, args.test_images,
                           eval_rows[bits[0]], args.data_root)
        rows, sessions = [], {}
        for i, (b, s_path) in enumerate(zip(bits, st, strict=True)):
            preds = torch_predictions(s_path, x)
            for f in (forms[:1] if b == "fp" else forms):  # fp: one FP32 graph, whatever the form
                row, sess = onnx_row(b, "fp32" if b == "fp" else f, ox[f][i], s_path, preds, x, y, args, work)
                rows.append(row)
                sessions[f"{row['bits']}/{row['form']}"] = sess
        t1 = timed_rounds(sessions, x[:1].numpy(), args.repeats, args.rounds)
        t32 = timed_rounds(sessions, x[:32].numpy(), max(args.repeats // 4, 5 * args.rounds), args.rounds)
    base = "fp/fp32"
    for r in rows:
        key = f"{r['bits']}/{r['form']}"
        r.update(latency_b1_ms=1e3 * statistics.median(t1[key]), latency_b32_ms=1e3 * statistics.median(t32[key]),
                 throughput_b32=32.0 / statistics.median(t32[key]),
                 speed_b1_vs_fp32=statistics.median(f / q for f, q in zip(t1[base], t1[key], strict=True)),
                 speed_b32_vs_fp32=statistics.median(f / q for f, q in zip(t32[base], t32[key], strict=True)),
                 b1_ms_rounds=[1e3 * t for t in t1[key]], b32_ms_rounds=[1e3 * t for t in t32[key]])
    print(f"\nmachine: {cpu_name()}, {args.threads} onnxruntime intra-op thread(s); onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}; model: {pcfg.backbone} width {pcfg.width} at {pcfg.image_size} px "
          f"({pcfg.method}, {pcfg.dataset}); {len(x)} test images; {args.rounds} timing rounds")
    print(f"{'bits':>6} {'form':>8} {'b1 ms':>7} {'vs fp':>6} {'b32 img/s':>9} {'vs fp':>6} {'onnx KB':>8} {'packed KB':>9} "
          f"{'top1 onnx':>9} {'top1 pt':>8} {'diff':>6} {'disagree%':>9} {'nhwc%':>6}  kernels after optimisation")
    for r in rows:
        ints = ",".join(f"{k}x{v}" for k, v in sorted(r["integer_ops"].items())) or "none"
        print(f"{r['bits']:>6} {r['form']:>8} {r['latency_b1_ms']:7.3f} {r['speed_b1_vs_fp32']:6.2f} "
              f"{r['throughput_b32']:9.0f} {r['speed_b32_vs_fp32']:6.2f} {r['onnx_bytes'] / 1024:8.1f} "
              f"{r['packed_bytes'] / 1024:9.1f} {r['top1_onnx']:9.2f} {r['top1_torch']:8.2f} {r['top1_diff']:6.2f} "
              f"{r['pred_disagree']:9.2f} {r['torch_nhwc_disagree']:6.2f}  int: {ints}; float Conv {r['float_conv']}, "
              f"BN {r['batchnorm']}, DQ {r['dequantize']}, Q {r['quantize']}")
    bad = [f"{r['bits']}/{r['form']}" for r in rows if not r["top1_within_0.1"]]
    print("top-1 ONNX vs PyTorch within 0.1 point: " + ("all" if not bad else f"NOT at {bad}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_name(), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
