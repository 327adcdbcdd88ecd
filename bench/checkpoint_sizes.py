"""Checkpoint sizes per bit-width for ResNet-18 and ResNet-50 (full width, ImageNet stem).

Random-init backbones calibrated on random 224 px inputs (sizes do not depend on the weights'
values). For each bit-width: the packed safetensors file against its ideal (``b/8`` bytes per
quantized weight + every FP tensor + the metadata), the FP32 file, and the ONNX QDQ graph. On 2
random images: the reloaded module against the fake-quant model; onnxruntime against the reloaded
module; the same PyTorch module run channels-last against contiguous (another conv summation
order: the model's own sensitivity to ulp-level differences, which the ONNX difference should
match); and the activation codes onnxruntime computes against the fake quantizer's formula applied
to onnxruntime's own inputs at each quant point.

    .venv/bin/python bench/checkpoint_sizes.py [--models resnet18 resnet50] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ssql_core.export import fake_quant_reference, load_quantized, save_quantized, size_report
from ssql_core.export.onnx_graph import compare_onnx, quant_point_agreement, write_onnx
from ssql_core.export.quantized import quantize_backbone
from ssql_core.models import build_backbone
from ssql_core.qnn import bind_context

BITS = ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w4a"]


def bench(name: str, out: Path, calib_images: int, image_size: int) -> list[dict]:
    torch.manual_seed(0)
    bb = build_backbone(name, "imagenet", 1.0).eval()
    ctx = bind_context(bb)
    with ctx.recording(), torch.no_grad():
        bb(torch.randn(calib_images, 3, image_size, image_size))
    x = torch.randn(2, 3, image_size, image_size)
    rows = []
    fp_bytes = None
    for bits in BITS:
        t0 = time.perf_counter()
        path = save_quantized(bb, bits, out / f"{name}-{bits}.safetensors")
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = load_quantized(path)
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            diff = float((model(x) - fake_quant_reference(bb, bits, x)).abs().max())
        rep = size_report(path)
        fp_bytes = fp_bytes or rep["file_bytes"]
        q = quantize_backbone(bb, bits)
        onnx_path = write_onnx(out / f"{name}-{bits}.onnx", q)
        onnx_cmp = compare_onnx(onnx_path, model, x)
        codes = quant_point_agreement(onnx_path, x) if not q.bits.is_fp else {"mismatched": 0, "elements": 0}
        with torch.no_grad():  # the same PyTorch model with another conv algorithm: its own sensitivity
            nhwc = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
            model.to(memory_format=torch.contiguous_format)
            self_diff = float((nhwc - model(x)).abs().max())
        rows.append({"model": name, **rep, "vs_fp32": rep["file_bytes"] / fp_bytes, "onnx_bytes": onnx_path.stat().st_size,
                     "save_s": t_save, "load_s": t_load, "reload_max_abs_diff": diff, "onnx_max_abs_diff": onnx_cmp["max_abs_diff"],
                     "max_abs_ref": onnx_cmp["max_abs_ref"], "nhwc_max_abs_diff": self_diff,
                     "code_mismatch": f"{codes['mismatched']}/{codes['elements']:,}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--calib-images", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
              f"load average {os.getloadavg()[0]:.1f} at start, torch {torch.__version__}, Python {platform.python_version()}")
        print(f"# calibration: {args.calib_images} random images at {args.image_size} px")
        header = "| model | bits | quantized weights | file bytes | ideal bytes | file / ideal | file / fp32 | ONNX bytes | save s | load s | reload max abs diff | max abs output | ONNX max abs diff | NHWC max abs diff | ONNX code mismatches |"
        print(header)
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in args.models:
            for r in bench(name, out, args.calib_images, args.image_size):
                print(f"| {r['model']} | {r['bits']} | {r['quantized_weights']:,} | {r['file_bytes']:,} | {int(r['ideal_bytes']):,} | "
                      f"{r['ratio']:.4f} | {r['vs_fp32']:.4f} | {r['onnx_bytes']:,} | {r['save_s']:.2f} | {r['load_s']:.2f} | {r['reload_max_abs_diff']:.1e} | "
                      f"{r['max_abs_ref']:.3g} | {r['onnx_max_abs_diff']:.1e} | {r['nhwc_max_abs_diff']:.1e} | {r['code_mismatch']} |", flush=True)


if __name__ == "__main__":
    main()
