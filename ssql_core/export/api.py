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


def load_heads(path: str | Path, pcfg: PretrainConfig) -> tuple[dict[str, Any], EvalConfig]:
    """An evaluation's ``heads.pt`` of the same pretrain run, and that evaluation's config."""
    try:
        state = ckpt.load(path)  # weights_only: tensors and plain containers, never objects
    except Exception as e:
        raise ValueError(f"{path} is not a readable heads file (heads.pt): {e}") from None
    if not isinstance(state, dict) or state.get("kind") != "linear_heads":
        raise ValueError(f"{path} is not an evaluation's heads file (heads.pt)")
    if state.get("pretrain_config") != pcfg.to_dict():
        raise ValueError(f"{path} was trained on a different pretrain run's backbone than the source checkpoint")
    return state, EvalConfig.from_dict(state["config"])


def _head_for(state: dict[str, Any], path: str | Path, bits: str, feat_dim: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    heads = state.get("heads") or {}
    if bits not in heads:
        raise ValueError(f"{path} has no head for {bits}; it has {sorted(heads)}")
    head = heads[bits]
    w, b = head.get("weight"), head.get("bias")
    if not isinstance(w, Tensor) or not isinstance(b, Tensor) or w.dim() != 2 or w.shape[1] != feat_dim or b.shape != (w.shape[0],):
        raise ValueError(f"{path}: the {bits} head is not a linear layer on {feat_dim} features")
    row = next((r for r in state.get("rows", []) if r.get("bits") == bits), None)
    return head, {"heads_file": Path(path).name, "bits": bits, "row": row, "num_classes": int(w.shape[0])}


def export_checkpoints(source: str | Path, bits: list[str], out_dir: str | Path, fmt: str = "safetensors",
                       calib: Calibration = None, heads: str | Path | None = None, source_job: str | None = None,
                       device: str = "cpu", calibration: str | None = None, calib_percentile: float | None = None) -> list[Path]:
    """:func:`export_checkpoint` for several bit-widths, loading and calibrating once.

    Min-max and percentile ranges recorded in FP do not depend on the bit-width, so one calibration
    serves every file; ``mse`` or quantized-weight calibration runs once per file.
    ``calibration`` / ``calib_percentile`` override the range rule of the (default) spec.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    parsed = [parse_bits(b) for b in bits]
    if not parsed:
        raise ValueError("give at least one bit-width")
    if fmt == "torchvision" and any(not b.is_fp for b in parsed):
        raise ValueError("the torchvision format holds FP weights only (torchvision has no quantized activations): use bits='fp'")
    pcfg, method = load_pretrained(source)
    dev = resolve_device(device)
    backbone = method.backbone.to(dev).eval()
    heads_state, info = None, {}
    if heads is not None:
        heads_state, ecfg = load_heads(heads, pcfg)
        if calib is None:
            calib = CalibrationSpec.from_eval(ecfg)
        for b in parsed:  # refuse before any work
            _head_for(heads_state, heads, str(b), int(backbone.feat_dim))
    if calibration is not None:
        if calib is None:
            calib = CalibrationSpec()
        if not isinstance(calib, CalibrationSpec):
            raise ValueError("calibration= applies to a CalibrationSpec, not to caller-supplied batches")
        calib = calib.with_method(calibration, calib_percentile)
    per_bits = isinstance(calib, CalibrationSpec) and calib.per_bits
    ctx = bind_context(backbone)
    if any(not b.is_fp for b in parsed) and not per_bits:
        info["calibration"] = run_calibration(backbone, ctx, calib, pcfg, dev)
    backbone = backbone.cpu()
    info["source"] = {"job": source_job, "checkpoint": Path(source).name, "method": pcfg.method, "dataset": pcfg.dataset,
                      "image_size": pcfg.image_size, "pretrain_config": pcfg.to_dict()}
    paths = []
    for b in parsed:
        if per_bits and not b.is_fp:
            info["calibration"] = run_calibration(backbone, ctx, calib, pcfg, torch.device("cpu"), str(b))
        head, extra = None, {}
        if heads_state is not None:
            head, hinfo = _head_for(heads_state, heads, str(b), int(backbone.feat_dim))  # type: ignore[arg-type]
            extra["evaluation"] = hinfo
        file_info = {**info, **extra} if not b.is_fp else {k: v for k, v in {**info, **extra}.items() if k != "calibration"}
        out = Path(out_dir) / f"{'classifier' if head is not None else 'backbone'}-{b}{SUFFIX[fmt]}"
        if fmt == "torchvision":
            from ssql_core.export.torchvision_format import write_torchvision

            paths.append(write_torchvision(out, backbone, head, file_info))
        elif fmt == "onnx":
            from ssql_core.export.onnx_graph import write_onnx

            paths.append(write_onnx(out, quantize_backbone(backbone, b), head, file_info))
        else:
            paths.append(write_quantized(out, quantize_backbone(backbone, b), head, file_info))
    return paths


def export_checkpoint(source: str | Path, bits: str, out_dir: str | Path, fmt: str = "safetensors",
                      calib: Calibration = None, heads: str | Path | None = None, source_job: str | None = None,
                      device: str = "cpu") -> Path:
    """Export the pretrain run ``source`` (its ``last.pt``) at ``bits`` as one ``fmt`` file in ``out_dir``.

    ``calib``: ``None`` (SPEC 6.2 defaults on the run's training data, or the evaluation's
    calibration when ``heads`` is given), a :class:`CalibrationSpec`, batches, or a callable
    returning batches. ``heads``: an evaluation's ``heads.pt``; its head for ``bits`` makes the file
    a complete classifier. ``source_job`` is recorded in the manifest. Returns the written path,
    ``out_dir/{backbone|classifier}-{bits}{.safetensors|.onnx|.torchvision.safetensors}``.
    """
    return export_checkpoints(source, [bits], out_dir, fmt, calib, heads, source_job, device)[0]


def load_quantized(path: str | Path) -> QuantizedModel:
    """Rebuild the module of a packed checkpoint; ``ValueError`` for anything not a valid one.

    Only safetensors is parsed (no pickle, no code): the sha256 over manifest and tensors is checked
    first, then every manifest entry against the architecture.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        raise CheckpointError(f"{path}: ONNX files run in onnxruntime (ssql_core.export.onnx_graph.read_onnx / onnx_session), not as torch modules")
    manifest, tensors = read_safetensors(path, FORMAT)
    try:
        q, head = decode(manifest, tensors)
        return build_quantized_model(q, head, manifest)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        # a manifest that is valid JSON and hashes correctly but lies about its contents
        raise CheckpointError(f"{path}: manifest and tensors do not describe a {FORMAT}: {type(e).__name__}: {e}") from None


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
