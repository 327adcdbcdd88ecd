"""The packed safetensors file of one bit-width, with its manifest and an integrity hash.

Tensors (names are the backbone's torchvision names, prefixed ``backbone.`` / ``head.``):

* ``backbone.<layer>.weight.packed``: U8 bitstream of the ``b``-bit integer weight
  (:mod:`ssql_core.export.packing`); ``backbone.<layer>.weight.scale``: F32 per output channel;
* ``backbone.<act point>.range``: F32 ``[lo, hi]``, the calibrated activation range;
* every other backbone tensor (BN affine and running statistics, unfolded) as stored in training;
  at ``fp`` the weights too, as F32;
* ``head.weight`` / ``head.bias``: the evaluation's FP linear classifier, when exported with one.

Metadata (strings): ``format``, ``format_version``, ``manifest`` (JSON: architecture, bits, per
tensor packing, quantizer formulas and ``rounding``, calibration, source) and ``sha256`` over the manifest and every
tensor's name, dtype, shape and bytes. Reading parses only safetensors (no pickle) and refuses a
file whose hash, structure or manifest does not check out, with a ``ValueError`` that says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ssql_core.bitconfig import BitConfig, parse_bit_config
from ssql_core.bits import BitWidth, parse_bits
from ssql_core.export.packing import LAYOUT, pack_bits, packed_nbytes, unpack_bits
from ssql_core.export.quantized import QuantizedBackbone, QuantizedWeight
from ssql_core.models import BACKBONES

FORMAT = "ssql-quantized-checkpoint"
FORMAT_VERSION = 1
#: files of a per-layer configuration (mixed widths; docs/decisions/020): the same tensors and
#: per-entry fields, a ``bit_config`` in the manifest and its label as ``bits``; a reader of
#: version 1 alone refuses them by version rather than misreading ``bits``
MIXED_FORMAT_VERSION = 2
READ_VERSIONS = (str(FORMAT_VERSION), str(MIXED_FORMAT_VERSION))
MAX_WIDTH = 4.0  # the largest width multiplier PretrainConfig accepts

#: the quantizer's arithmetic per ``rounding`` (the manifest's top-level ``rounding``; files
#: written before it existed were all ``reciprocal``)
_DIV = {"reciprocal": "x * (1 / s)", "divide": "x / s"}


def quantizer_description(rounding: str = "reciprocal") -> dict[str, str]:
    """The manifest's ``quantizer`` entry: the formulas the file's integers and ranges follow."""
    w, x = _DIV[rounding].replace("x", "w").replace("s", "scale[c]"), _DIV[rounding]
    return {
        "weights": "symmetric per output channel (axis 0): w = w_int * scale[c]; "
                   f"scale[c] = max|w_c| / ((2^b - 1) / 2), w_int = clamp(round({w}), -2^(b-1), 2^(b-1) - 1)",
        "activations": "asymmetric per tensor from the calibrated range [lo, hi]: s = (hi - lo) / (2^b - 1), "
                       f"z = -round(lo / s), q = clamp(round({x}) + z, 0, 2^b - 1), x_hat = (q - z) * s",
        "rounding": f"half to even, of {_DIV[rounding]} in float32 ({rounding})",
        "unquantized": "input image, residual branch before the add, pooled feature, head",
    }

PACKING = {
    "layout": LAYOUT,
    "description": "value i (C order) occupies stream bits [i*b, (i+1)*b), least significant bit first; "
                   "stream bit j is bit j % 8 of byte j // 8; two's complement truncated to b bits; "
                   "last byte zero-padded",
}


class CheckpointError(ValueError):
    """A file is not a valid SSQL checkpoint (truncated, tampered with, or not ours)."""


def tensor_digest(manifest_json: str, tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the manifest and every tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(manifest_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def encode(q: QuantizedBackbone, head: dict[str, Tensor] | None, info: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of the file for ``q`` (+ ``head``); ``info`` adds manifest entries."""
    tensors: dict[str, Tensor] = {}
    weights: dict[str, Any] = {}
    for name, w in q.weights.items():
        key = f"backbone.{name}"
        tensors[f"{key}.packed"] = pack_bits(w.ints, w.bits)
        tensors[f"{key}.scale"] = w.scale.float().contiguous()
        weights[key] = {"bits": w.bits, "role": w.role, "shape": list(w.ints.shape), "axis": 0,
                        "packed": f"{key}.packed", "scale": f"{key}.scale", "layout": LAYOUT}
    activations: dict[str, Any] = {}
    for name, (rng, bits, role) in q.ranges.items():
        key = f"backbone.{name}"
        tensors[f"{key}.range"] = rng.float().contiguous()
        activations[key] = {"bits": bits, "role": role, "range": f"{key}.range", "scheme": "asymmetric per-tensor"}
    for name, t in q.fp.items():
        tensors[f"backbone.{name}"] = t.contiguous()
    if head is not None:
        tensors["head.weight"] = head["weight"].float().contiguous()
        tensors["head.bias"] = head["bias"].float().contiguous()
    mixed = isinstance(q.bits, BitConfig)
    manifest = {
        "format": FORMAT,
        "format_version": MIXED_FORMAT_VERSION if mixed else FORMAT_VERSION,
        "kind": "classifier" if head is not None else "backbone",
        "arch": q.arch,
        "bits": str(q.bits),
        "weight_bits": None if mixed else q.bits.w,  # type: ignore[union-attr]
        "act_bits": None if mixed else q.bits.a,  # type: ignore[union-attr]
        **({"bit_config": q.bits.as_dict()} if mixed else {}),  # type: ignore[union-attr]
        "bn_folded": False,
        "quantizer": quantizer_description(q.rounding) if not q.bits.is_fp else None,
        **({"rounding": q.rounding} if not q.bits.is_fp else {}),
        "packing": PACKING if not q.bits.is_fp else None,
        "weights": weights,
        "activations": activations,
        "head": None if head is None else {"tensors": ["head.weight", "head.bias"], "num_classes": int(head["weight"].shape[0]),
                                           "in_features": int(head["weight"].shape[1]), "precision": "fp32"},
        "torch_version": torch.__version__.split("+")[0],
        **info,
    }
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    metadata = {"format": FORMAT, "format_version": str(manifest["format_version"]), "manifest": manifest_json,
                "sha256": tensor_digest(manifest_json, tensors)}
    return tensors, metadata


def write_quantized(path: str | Path, q: QuantizedBackbone, head: dict[str, Tensor] | None = None, info: dict[str, Any] | None = None) -> Path:
    """Write the packed checkpoint of ``q`` to ``path`` (atomically); returns the path."""
    path = Path(path)
    tensors, metadata = encode(q, head, info or {})
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | Path, expected_format: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Parse, hash-check and return ``(manifest, tensors)``; ``CheckpointError`` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (or not a regular file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error type for every malformed file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None
    if metadata.get("format") != expected_format:
        raise CheckpointError(f"{path}: not an {expected_format} file (format={metadata.get('format')!r})")
    if metadata.get("format_version") not in READ_VERSIONS:
        raise CheckpointError(f"{path}: format version {metadata.get('format_version')!r} is not supported "
                              f"(this library reads {', '.join(READ_VERSIONS)})")
    manifest_json = metadata.get("manifest", "")
    if tensor_digest(manifest_json, tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path}: sha256 mismatch: the file was modified or corrupted after export")
    try:
        manifest = json.loads(manifest_json)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest is not a JSON object")
    if str(manifest.get("format_version")) != metadata.get("format_version"):
        raise CheckpointError(f"{path}: the manifest's format version {manifest.get('format_version')!r} differs from the file's")
    return manifest, tensors


def check_arch(arch: Any) -> dict[str, Any]:
    if not isinstance(arch, dict):
        raise CheckpointError("manifest.arch is missing")
    name, stem, width = arch.get("name"), arch.get("stem"), arch.get("width")
    if name not in BACKBONES or stem not in ("cifar", "imagenet"):
        raise CheckpointError(f"manifest.arch: unknown architecture {name!r} / stem {stem!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.03125 <= width <= MAX_WIDTH:
        raise CheckpointError(f"manifest.arch.width must be a number in [0.03125, {MAX_WIDTH}], got {width!r}")
    return {"name": name, "stem": stem, "width": float(width)}


def decode(manifest: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[QuantizedBackbone, dict[str, Tensor] | None]:
    """Rebuild the :class:`QuantizedBackbone` (and head) a manifest describes, checking every entry."""
    bits = _manifest_bits(manifest)
    rounding = manifest.get("rounding", "reciprocal")  # absent: a file from before the field, all reciprocal
    if rounding not in _DIV:
        raise CheckpointError(f"manifest.rounding must be one of {list(_DIV)}, got {rounding!r}")
    q = QuantizedBackbone(arch=check_arch(manifest.get("arch")), bits=bits, rounding=rounding)
    used: set[str] = set()

    def take(name: Any, dtype: torch.dtype) -> Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise CheckpointError(f"tensor {name!r} named by the manifest is missing")
        t = tensors[name]
        if t.dtype != dtype:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {dtype}")
        used.add(name)
        return t

    for key, entry in (manifest.get("weights") or {}).items():
        if not isinstance(entry, dict) or not key.startswith("backbone."):
            raise CheckpointError(f"manifest.weights[{key!r}] is malformed")
        b, shape = entry.get("bits"), entry.get("shape")
        if entry.get("layout") != LAYOUT or not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8:
            raise CheckpointError(f"{key}: unsupported packing {entry.get('layout')!r} at {b!r} bits")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise CheckpointError(f"{key}: bad shape {shape!r}")
        count = math.prod(shape)
        packed, scale = take(entry.get("packed"), torch.uint8), take(entry.get("scale"), torch.float32)
        if packed.dim() != 1 or packed.numel() != packed_nbytes(count, b):
            raise CheckpointError(f"{key}: {count} values at {b} bits need {packed_nbytes(count, b)} bytes, found {packed.numel()}")
        if scale.shape != (shape[0],):
            raise CheckpointError(f"{key}: scale shape {tuple(scale.shape)} != ({shape[0]},)")
        ints = unpack_bits(packed, b, count).reshape(shape)
        q.weights[key.removeprefix("backbone.")] = QuantizedWeight(ints, scale, b, str(entry.get("role")))
    for key, entry in (manifest.get("activations") or {}).items():
        if not isinstance(entry, dict) or not key.startswith("backbone."):
            raise CheckpointError(f"manifest.activations[{key!r}] is malformed")
        rng = take(entry.get("range"), torch.float32)
        if rng.shape != (2,) or not bool(torch.isfinite(rng).all()) or float(rng[0]) > float(rng[1]):
            raise CheckpointError(f"{key}: range must be a finite [lo, hi], got {rng.tolist()}")
        q.ranges[key.removeprefix("backbone.")] = (rng, int(entry.get("bits", 0)), str(entry.get("role")))
    head = None
    if manifest.get("head") is not None:
        head = {"weight": take("head.weight", torch.float32), "bias": take("head.bias", torch.float32)}
        if head["weight"].dim() != 2 or head["bias"].shape != (head["weight"].shape[0],):
            raise CheckpointError("head: weight must be [classes, features] and bias [classes]")
    for name, t in tensors.items():
        if name not in used:
            if not name.startswith("backbone."):
                raise CheckpointError(f"unexpected tensor {name!r}")
            q.fp[name.removeprefix("backbone.")] = t
    return q, head


def _manifest_bits(manifest: dict[str, Any]) -> BitWidth | BitConfig:
    """The file's bits: a bit-width (version 1), or a per-layer configuration (version 2) whose
    label the manifest's ``bits`` must be."""
    if manifest.get("format_version") == MIXED_FORMAT_VERSION:
        try:
            config = parse_bit_config(manifest.get("bit_config"))  # type: ignore[arg-type]
        except ValueError as e:
            raise CheckpointError(f"manifest.bit_config: {e}") from None
        if manifest.get("bits") != config.label:
            raise CheckpointError(f"manifest.bits {manifest.get('bits')!r} is not the label of its bit_config ({config.label})")
        return config
    if "bit_config" in manifest:
        raise CheckpointError(f"a per-layer bit_config needs format version {MIXED_FORMAT_VERSION}")
    try:
        return parse_bits(manifest.get("bits"))
    except ValueError as e:
        raise CheckpointError(f"manifest.bits: {e}") from None


def size_report(path: str | Path) -> dict[str, Any]:
    """File bytes against the ideal: ``b/8`` bytes per quantized weight + FP tensors + metadata."""
    manifest, tensors = read_safetensors(path, FORMAT)
    packed = {e["packed"]: e for e in manifest["weights"].values()}
    ideal_weights = sum(math.prod(e["shape"]) * e["bits"] / 8 for e in packed.values())
    fp_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in packed)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    meta_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
    ideal = ideal_weights + fp_bytes + meta_bytes
    size = Path(path).stat().st_size
    return {"bits": manifest["bits"], "file_bytes": size, "ideal_bytes": ideal, "ratio": size / ideal,
            "quantized_weights": int(sum(math.prod(e["shape"]) for e in packed.values())),
            "weight_bytes_ideal": ideal_weights, "fp_bytes": fp_bytes, "metadata_bytes": meta_bytes}
