"""What the service calls: export one bit-width of a pretrain run, and load what was exported.

``export_checkpoint(source, bits, out_dir, fmt, calib, heads, source_job)`` reads ``last.pt``
(``weights_only`` torch.load: our own training output), calibrates, and writes one file:

* ``"safetensors"``: the packed quantized checkpoint (:mod:`ssql_core.export.format`);
* ``"onnx"``: a QDQ graph at the bit-width (:mod:`ssql_core.export.onnx_graph`);
* ``"torchvision"``: FP weights under torchvision's names (:mod:`ssql_core.export.torchvision_format`).

``load_quantized(path)`` parses only safetensors and returns the rebuilt module.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssql_core import checkpoint as ckpt
from ssql_core.bitconfig import (
    BitConfig,
    MixedBits,
    as_bits,
    is_label,
    parse_bit_config,
    parse_bits_spec,
    resolve,
)
from ssql_core.bits import BitWidth
from ssql_core.config import PTQ_METHODS, EvalConfig, PretrainConfig
from ssql_core.export.calibration import (
    Calibration,
    CalibrationSpec,
    calibration_loader,
    run_calibration,
)
from ssql_core.export.format import (
    FORMAT,
    CheckpointError,
    decode,
    read_safetensors,
    write_quantized,
)
from ssql_core.export.quantized import (
    QuantizedModel,
    bound_rounding,
    build_quantized_model,
    quantize_backbone,
)
from ssql_core.ptq.rounding import (
    Reconstruction,
    apply_reconstruction,
    clear_rounding,
    current_ranges,
)
from ssql_core.qnn import QuantContext, act_points, bind_context
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
                       device: str = "cpu", calibration: str | None = None, calib_percentile: float | None = None,
                       ptq: str | None = None, ptq_images: int = 1024, ptq_iters: int = 2000,
                       brecq_learn_act: bool = False, ptq_state_dir: str | Path | None = None, onnx_form: str = "integer") -> list[Path]:
    """:func:`export_checkpoint` for several bit-widths, loading and calibrating once.

    Min-max and percentile ranges recorded in FP do not depend on the bit-width, so one calibration
    serves every file; ``mse`` or quantized-weight calibration runs once per file.
    ``calibration`` / ``calib_percentile`` override the range rule of the (default) spec.
    ``ptq="adaround"`` / ``"brecq"`` reconstructs every quantized file's rounding
    (:mod:`ssql_core.ptq`) on ``ptq_images`` images of the calibration source before any file is
    written; with ``heads`` the evaluation's own reconstruction (kept in its ``heads.pt``) is used.
    ``ptq_state_dir``: where each reconstruction keeps its per-unit state (``ptq-{bits}.pt``), so a
    rerun after a crash continues it and a second call (another format) reuses it; the caller
    removes the states when it has every file. ``onnx_form``: the ONNX graph's form
    (:data:`ssql_core.export.onnx_graph.FORMS`; ``integer`` runs the convs as integer kernels,
    ``storage`` is the smallest file).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        from ssql_core.export.onnx_graph import FORMS

        if onnx_form not in FORMS:
            raise ValueError(f"onnx_form must be one of {list(FORMS)}, got {onnx_form!r}")
    specs = [b if is_label(b) else parse_bits_spec(b) for b in bits]
    if not specs:
        raise ValueError("give at least one bit-width")
    if heads is None and (labels := [b for b in specs if isinstance(b, str)]):
        raise ValueError(f"{labels[0]} names a per-layer configuration of an evaluation: export it with that evaluation's "
                         "heads, or give the map itself")
    if fmt == "torchvision" and any(isinstance(b, str) or not b.is_fp for b in specs):
        raise ValueError("the torchvision format holds FP weights only (torchvision has no quantized activations): use bits='fp'")
    if ptq is not None and ptq not in PTQ_METHODS:
        raise ValueError(f"ptq must be one of {list(PTQ_METHODS)}, got {ptq!r}")
    pcfg, method = load_pretrained(source)
    dev = resolve_device(device)
    backbone = method.backbone.to(dev).eval()
    heads_state, info = None, {}
    if heads is not None:
        heads_state, ecfg = load_heads(heads, pcfg)
    parsed = [_resolve_bits(b, backbone, heads_state, heads) for b in specs]
    if heads is not None:
        assert heads_state is not None
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
    # the quantizer's rounding the evaluation ran with (its own setting, else the run's): MSE
    # calibration, reconstruction and the integers then follow the model the user evaluated
    rounding = (ecfg.rounding if heads is not None else None) or pcfg.rounding or "reciprocal"
    ctx = bind_context(backbone, QuantContext(rounding=rounding))
    if any(not b.is_fp for b in parsed) and not per_bits:
        info["calibration"] = run_calibration(backbone, ctx, calib, pcfg, dev)
    recons, recon_calib = _reconstructions(backbone, ctx, parsed, calib, pcfg, dev, heads, heads_state, ptq, ptq_images,
                                           ptq_iters, brecq_learn_act, per_bits, ptq_state_dir)
    backbone = backbone.cpu()
    info["source"] = {"job": source_job, "checkpoint": Path(source).name, "method": pcfg.method, "dataset": pcfg.dataset,
                      "image_size": pcfg.image_size, "pretrain_config": pcfg.to_dict()}
    paths = []
    for b in parsed:
        if str(b) in recon_calib:
            info["calibration"] = recon_calib[str(b)]
        elif per_bits and not b.is_fp:
            info["calibration"] = run_calibration(backbone, ctx, calib, pcfg, torch.device("cpu"), b)
        head, extra = None, {}
        if heads_state is not None:
            head, hinfo = _head_for(heads_state, heads, str(b), int(backbone.feat_dim))  # type: ignore[arg-type]
            extra["evaluation"] = hinfo
        file_info = {**info, **extra} if not b.is_fp else {k: v for k, v in {**info, **extra}.items() if k != "calibration"}
        out = Path(out_dir) / f"{'classifier' if head is not None else 'backbone'}-{b}{SUFFIX[fmt]}"
        if fmt == "torchvision":
            from ssql_core.export.torchvision_format import write_torchvision

            paths.append(write_torchvision(out, backbone, head, file_info))
            continue
        recon = recons.get(str(b))
        saved = current_ranges(backbone)
        if recon is not None:
            apply_reconstruction(backbone, recon)
            file_info["ptq"] = {**recon.summary(), **({"source": "evaluation"} if heads_state is not None else {}),
                                "per_unit": recon.units}
        elif not b.is_fp:
            file_info["ptq"] = {"method": "calibrate"}
        try:
            q = quantize_backbone(backbone, b)
        finally:
            clear_rounding(backbone)
            _set_ranges(backbone, saved)
        if fmt == "onnx":
            from ssql_core.export.onnx_graph import write_onnx

            paths.append(write_onnx(out, q, head, file_info, form=onnx_form))
        else:
            paths.append(write_quantized(out, q, head, file_info))
    return paths


def _resolve_bits(spec: Any, backbone: nn.Module, heads_state: dict[str, Any] | None, heads: Any) -> BitWidth | MixedBits:
    """A bit-width, a per-layer map (resolved against ``backbone``), or the label of a map an
    evaluation ran (kept in its ``heads.pt``)."""
    if isinstance(spec, str):
        configs = (heads_state or {}).get("bit_configs") or {}
        if spec not in configs:
            raise ValueError(f"{heads} holds no per-layer configuration {spec}; it has {sorted(configs) or 'none'}")
        spec = parse_bit_config(configs[spec])
    if isinstance(spec, BitConfig):
        return resolve(spec, backbone)
    return spec


def _set_ranges(backbone: nn.Module, ranges: dict[str, Tensor]) -> None:
    points = act_points(backbone)
    for name, r in ranges.items():
        points[name].lo.fill_(float(r[0]))
        points[name].hi.fill_(float(r[1]))


def _reconstructions(backbone: nn.Module, ctx: Any, parsed: list[Any], calib: Calibration, pcfg: PretrainConfig,
                     dev: torch.device, heads: Any, heads_state: dict[str, Any] | None, ptq: str | None, ptq_images: int,
                     ptq_iters: int, learn_act: bool, per_bits: bool,
                     state_dir: str | Path | None = None) -> tuple[dict[str, Reconstruction], dict[str, Any]]:
    """Each quantized file's reconstruction: the evaluation's (from ``heads``) or one run now, all
    before any file is written (a reconstruction that fails leaves no file behind); and, where
    the ranges depend on the bits, the calibration each was run on."""
    quantized = [b for b in parsed if not b.is_fp]
    if heads_state is not None:
        ecfg_ptq = (heads_state.get("config") or {}).get("ptq", "calibrate")
        if ptq is not None and ptq != ecfg_ptq:
            raise ValueError(f"the classifier's head was trained on the evaluation's {ecfg_ptq!r} model: "
                             f"ptq={ptq!r} would not be the model it classifies; export the backbone from the pretrain job")
        stored = heads_state.get("ptq") or {}
        missing = [str(b) for b in quantized if ecfg_ptq != "calibrate" and str(b) not in stored]
        if missing:
            raise ValueError(f"{heads} holds no {ecfg_ptq} reconstruction for {missing}")
        return {str(b): Reconstruction.from_state(stored[str(b)]) for b in quantized if str(b) in stored}, {}
    if ptq in (None, "calibrate") or not quantized:
        return {}, {}
    from ssql_core.ptq import ReconConfig, reconstruct

    if isinstance(calib, CalibrationSpec) or calib is None:
        spec = dataclasses.replace(calib or CalibrationSpec(), images=ptq_images, method="minmax", weights="fp")
        images: Any = calibration_loader(spec, pcfg)[0]
    else:
        images = list(calib() if callable(calib) and not isinstance(calib, (DataLoader, list, tuple)) else calib)
    cfg = ReconConfig(method=ptq, iters=ptq_iters, learn_act=learn_act,
                      seed=calib.seed if isinstance(calib, CalibrationSpec) else 0)
    recons, calib_info = {}, {}
    for b in quantized:
        if per_bits:
            calib_info[str(b)] = run_calibration(backbone, ctx, calib, pcfg, dev, b)
        state = Path(state_dir) / f"ptq-{b}.pt" if state_dir is not None else None
        recons[str(b)] = reconstruct(backbone, ctx, images, dev, b, cfg, checkpoint=state)
    return recons, calib_info


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
def fake_quant_reference(backbone: nn.Module, bits: Any, x: Tensor) -> Tensor:
    """The fake-quant backbone's output at ``bits`` (ranges already calibrated, with the rounding
    of the context it is bound to): the oracle."""
    ctx = bind_context(backbone, QuantContext(rounding=bound_rounding(backbone)))
    backbone.eval()
    with ctx.quantized(as_bits(bits, backbone)):
        return backbone(x)


def save_quantized(backbone: nn.Module, bits: Any, path: str | Path, head: dict[str, Tensor] | None = None,
                   info: dict[str, Any] | None = None) -> Path:
    """Write a calibrated in-memory ``backbone`` at ``bits`` (a bit-width or a per-layer map) as a
    packed checkpoint (no ``last.pt``)."""
    return write_quantized(path, quantize_backbone(backbone, bits), head, info)
