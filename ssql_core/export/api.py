"""What the service calls: export one bit-width of a pretrain run, and load what was exported.

``export_checkpoint(source, bits, out_dir, fmt, calib, heads, source_job)`` reads ``last.pt``
(``weights_only`` torch.load: our own training output), calibrates, and writes one file:

* ``"safetensors"``: the packed quantized checkpoint (:mod:`ssql_core.export.format`);
* ``"onnx"``: a QDQ graph at the bit-width (:mod:`ssql_core.export.onnx_graph`);
* ``"torchvision"``: FP weights under torchvision's names (:mod:`ssql_core.export.torchvision_format`).

``load_quantized(path)`` parses only safetensors and returns the rebuilt module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssql_core import checkpoint as ckpt
from ssql_core.bits import parse_bits
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.export.calibration import Calibration, CalibrationSpec, run_calibration
from ssql_core.export.format import (
    FORMAT,
    CheckpointError,
    decode,
    read_safetensors,
    write_quantized,
)
from ssql_core.export.quantized import QuantizedModel, build_quantized_model, quantize_backbone
from ssql_core.qnn import bind_context
from ssql_core.runtime import resolve_device
from ssql_core.train import load_pretrained

FORMATS = ("safetensors", "onnx", "torchvision")
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchvision": ".torchvision.safetensors"}


def load_heads(path: str | Path, bits: str, pcfg: PretrainConfig) -> tuple[dict[str, Tensor], EvalConfig, dict[str, Any]]:
    """The linear head for ``bits`` from an evaluation's ``heads.pt`` of the same pretrain run."""
    state = ckpt.load(path)
    if not isinstance(state, dict) or state.get("kind") != "linear_heads":
        raise ValueError(f"{path} is not an evaluation's heads file (heads.pt)")
    if state.get("pretrain_config") != pcfg.to_dict():
        raise ValueError(f"{path} was trained on a different pretrain run's backbone than the source checkpoint")
    heads = state.get("heads") or {}
    if bits not in heads:
        raise ValueError(f"{path} has no head for {bits}; it has {sorted(heads)}")
    row = next((r for r in state.get("rows", []) if r.get("bits") == bits), None)
    return heads[bits], EvalConfig.from_dict(state["config"]), {"bits": bits, "row": row, "num_classes": state.get("num_classes")}


def prepare(source: str | Path, bits: str, calib: Calibration, heads: str | Path | None,
            device: str = "cpu") -> tuple[PretrainConfig, nn.Module, dict[str, Tensor] | None, dict[str, Any]]:
    """Load and calibrate the backbone of ``source``; returns config, backbone, head, manifest info."""
    b = parse_bits(bits)
    pcfg, method = load_pretrained(source)
    dev = resolve_device(device)
    backbone = method.backbone.to(dev).eval()
    head, info = None, {}
    if heads is not None:
        head, ecfg, hinfo = load_heads(heads, str(b), pcfg)
        info["evaluation"] = {"heads_file": Path(heads).name, **hinfo}
        if calib is None:
            calib = CalibrationSpec.from_eval(ecfg)
    if not b.is_fp:
        ctx = bind_context(backbone)
        info["calibration"] = run_calibration(backbone, ctx, calib, pcfg, dev)
    backbone = backbone.cpu()
    return pcfg, backbone, head, info


def export_checkpoint(source: str | Path, bits: str, out_dir: str | Path, fmt: str = "safetensors",
                      calib: Calibration = None, heads: str | Path | None = None, source_job: str | None = None,
                      device: str = "cpu") -> Path:
    """Export the pretrain run ``source`` (its ``last.pt``) at ``bits`` as one ``fmt`` file in ``out_dir``.

    ``calib``: ``None`` (SPEC 6.2 defaults on the run's training data, or the evaluation's
    calibration when ``heads`` is given), a :class:`CalibrationSpec`, batches, or a callable
    returning batches. ``heads``: an evaluation's ``heads.pt``; its head for ``bits`` makes the file
    a complete classifier. Returns the written path (``{backbone|classifier}-{bits}{suffix}``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    b = parse_bits(bits)
    if fmt == "torchvision" and not b.is_fp:
        raise ValueError("the torchvision format holds FP weights only (torchvision has no quantized activations): use bits='fp'")
    pcfg, backbone, head, info = prepare(source, str(b), calib, heads, device)
    info["source"] = {"job": source_job, "checkpoint": Path(source).name, "method": pcfg.method, "dataset": pcfg.dataset,
                      "image_size": pcfg.image_size, "pretrain_config": pcfg.to_dict()}
    out = Path(out_dir) / f"{'classifier' if head is not None else 'backbone'}-{b}{SUFFIX[fmt]}"
    if fmt == "torchvision":
        from ssql_core.export.torchvision_format import write_torchvision

        return write_torchvision(out, backbone, head, info)
    q = quantize_backbone(backbone, b)
    if fmt == "onnx":
        from ssql_core.export.onnx_graph import write_onnx

        return write_onnx(out, q, head, info)
    return write_quantized(out, q, head, info)


def load_quantized(path: str | Path) -> QuantizedModel:
    """Rebuild the module of a packed checkpoint; ``ValueError`` for anything not a valid one.

    Only safetensors is parsed (no pickle, no code): the sha256 over manifest and tensors is checked
    first, then every manifest entry against the architecture.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        raise CheckpointError(f"{path}: ONNX files run in onnxruntime (ssql_core.export.onnx_graph.run_onnx), not as torch modules")
    manifest, tensors = read_safetensors(path, FORMAT)
    q, head = decode(manifest, tensors)
    try:
        return build_quantized_model(q, head, manifest)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: tensors do not fit architecture {q.arch}: {e}") from None


@torch.no_grad()
def fake_quant_reference(backbone: nn.Module, bits: str, x: Tensor) -> Tensor:
    """The fake-quant backbone's output at ``bits`` (ranges already calibrated): the oracle."""
    ctx = bind_context(backbone)
    backbone.eval()
    with ctx.quantized(bits):
        return backbone(x)


def save_quantized(backbone: nn.Module, bits: str, path: str | Path, head: dict[str, Tensor] | None = None,
                   info: dict[str, Any] | None = None) -> Path:
    """Write a calibrated in-memory ``backbone`` at ``bits`` as a packed checkpoint (no ``last.pt``)."""
    return write_quantized(path, quantize_backbone(backbone, bits), head, info)
