"""Turn a submitted job body into a validated, complete spec using ssql_core's own validation.

Fields the server decides (paths, device, downloads) cannot be set by a request; server limits
(max epochs, batch size, image size) are checked on top of the library's. Any problem raises
:class:`FieldError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from api.errors import FieldError, FieldErrors
from persistence.settings import Settings
from ssql_core.bits import parse_bits
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.errors import ConfigError

#: config fields only the server sets; a request naming them is rejected
SERVER_FIELDS = ("data_root", "allow_download", "device", "num_workers")
EVAL_SERVER_FIELDS = (*SERVER_FIELDS, "checkpoint")


def _bad_string(value: str) -> str | None:
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds an unpaired surrogate such as \\ud800)"
    return None


def check_json_values(body: Any, loc: tuple[str | int, ...] = ("body",)) -> None:
    """Every string of a request body (keys too) storable as text, every number finite: a NUL
    byte or a lone surrogate cannot be stored by Postgres, and NaN / Infinity are no JSON. The
    first offender is a 422 naming it (the typed fields were checked by pydantic already; this
    covers method options and every other free-form value)."""
    if isinstance(body, dict):
        for k, v in body.items():
            if isinstance(k, str) and (reason := _bad_string(k)):
                raise FieldError((*loc, k), f"field name {reason}")
            check_json_values(v, (*loc, k))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            check_json_values(v, (*loc, i))
    elif isinstance(body, str):
        if reason := _bad_string(body):
            raise FieldError(loc, reason)
    elif isinstance(body, float) and not math.isfinite(body):
        raise FieldError(loc, f"must be a finite number, got {body!r}")


def _loc(field: str, top_level_options: set[str]) -> tuple[str, ...]:
    parts = tuple(field.split("."))
    if parts[0] == "method_options" and len(parts) > 1 and parts[1] in top_level_options:
        return ("body", parts[1])
    return ("body", *parts)


def _reject_server_fields(data: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if name in data:
            raise FieldError(("body", name), "is set by the server and cannot be chosen in a request")


def _limit(loc: tuple[str, ...], value: Any, maximum: int) -> None:
    if isinstance(value, int) and value > maximum:
        raise FieldError(loc, f"must be at most {maximum} on this server, got {value}")


#: the library's words for a range ("must be between 1 and 10000, got 0"), restated with this server's maximum
_RANGE_REASON = re.compile(r"^must be between (\S+) and (\S+), got (.+)$")


def _drop(data: dict[str, Any], field: str) -> bool:
    """Take the field a ConfigError names out of ``data`` (so the rest can be checked); False if the
    request did not give it (the error is about a default or a combination: nothing to set aside)."""
    parts = field.split(".")
    if parts[0] == "method_options" and len(parts) > 1 and parts[1] in (data.get("method_options") or {}):
        data["method_options"] = {k: v for k, v in data["method_options"].items() if k != parts[1]}
        return True
    return data.pop(parts[0], _MISSING) is not _MISSING


_MISSING = object()


def _validated(cls: type, data: dict[str, Any], settings: Settings, top_level_options: frozenset[str] | set[str] = frozenset(),
               caps: dict[str, int] | None = None, **fixed: Any) -> Any:
    """``cls.from_dict(data)`` with the server's own fields filled in, validated by ssql_core.

    Every bad field is reported in one 422 (:class:`FieldErrors`), not only the first: a field
    the library refuses is set aside and the rest is validated again. ``caps`` are this server's
    maxima (field -> most allowed, e.g. ``SSQL_MAX_EPOCHS``); a library range is restated with
    them, so one field never shows two different ranges."""
    caps = caps or {}
    data = dict(data)
    errors: list[FieldError] = []
    for name, cap in caps.items():
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            errors.append(FieldError(("body", name), f"must be at most {cap} on this server, got {value}"))
            del data[name]
    for _ in range(len(data) + 1):
        try:
            cfg = cls.from_dict(data)
            cfg.data_root = str(settings.resolved_data_root())
            cfg.allow_download = settings.allow_download
            for name, value in fixed.items():
                setattr(cfg, name, value)
            cfg = cfg.validate()
        except ConfigError as e:
            loc, reason = _loc(e.field, set(top_level_options)), e.reason
            if len(loc) == 2 and loc[1] in caps and (m := _RANGE_REASON.match(reason)):
                hi = m[2] if float(m[2]) <= caps[loc[1]] else str(caps[loc[1]])
                reason = f"must be between {m[1]} and {hi} on this server, got {m[3]}"
            errors.append(FieldError(loc, reason))
            if _drop(data, e.field):
                continue
        except TypeError as e:
            errors.append(FieldError(("body",), str(e)))
        break
    if len(errors) > 1:
        raise FieldErrors(errors)
    if errors:
        raise errors[0]
    return cfg


def pretrain_spec(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Validated pretrain spec ``{"config": {...}, "export_bits": [...]}`` with every default filled in.

    ``export_bits``: the packed checkpoints written after training (default: the paper's set).
    """
    from ssql_core.methods import METHODS

    body, export_bits = split_export_bits(body)
    data = {k: v for k, v in body.items() if k != "kind"}
    _reject_server_fields(data, SERVER_FIELDS)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    extras = {k: data.pop(k) for k in list(data) if k not in fields}
    method = data.get("method", PretrainConfig.method)
    if extras:
        accepted = sorted(getattr(METHODS.get(method), "default_options", {})) if method in METHODS else []
        for name in extras:
            if method in METHODS and name not in accepted:
                raise FieldError(
                    ("body", name),
                    f"unknown field; accepted: {sorted(fields - set(SERVER_FIELDS))} "
                    f"and the options of method {method!r}: {accepted}",
                )
        data["method_options"] = {**(data.get("method_options") or {}), **extras}
    cfg = _validated(PretrainConfig, data, settings, set(extras), caps={
        "epochs": settings.max_epochs, "batch_size": settings.max_batch_size, "image_size": settings.max_image_size,
        "devices": settings.max_devices})
    _limit(("body", "epochs"), cfg.epochs, settings.max_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    _limit(("body", "image_size"), cfg.image_size, settings.max_image_size)
    _limit(("body", "devices"), cfg.devices, settings.max_devices)
    if cfg.bits is not None:  # stored as the other kinds store theirs: "4W4F" -> "4w4a"
        cfg.bits = str(parse_bits(cfg.bits))
    config = cfg.to_dict()
    for name in SERVER_FIELDS:
        config.pop(name, None)
    return {"config": config, "export_bits": export_bits}


def eval_spec(body: dict[str, Any], settings: Settings, source_dataset: str,
              pretrain_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validated eval spec ``{"config": {...}, "source_job": id}``; bit-widths are canonicalised.

    ``pretrain_config`` (the source's) lets per-layer maps and autobit budgets be checked against
    the backbone now (its layers and sizes, built on the meta device): a map naming a layer the
    backbone lacks or missing one, or a budget no configuration meets, is a 422 here."""
    data = {k: v for k, v in body.items() if k not in ("kind", "source_job")}
    _reject_server_fields(data, EVAL_SERVER_FIELDS)
    cfg = _validated(EvalConfig, data, settings, caps={"epochs": settings.max_eval_epochs, "batch_size": settings.max_batch_size})
    backbone = meta_backbone(pretrain_config) if pretrain_config is not None else None
    bits = canonical_bits(("body", "bits"), cfg.bits, backbone)
    n_rows = len(bits) + (cfg.autobit is not None)
    if n_rows > settings.max_bits_per_eval:
        raise FieldError(("body", "bits"), f"at most {settings.max_bits_per_eval} bit-widths per job (autobit's choice counts as "
                         f"one), got {n_rows}")
    _limit(("body", "epochs"), cfg.epochs, settings.max_eval_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    if cfg.autobit is not None and backbone is not None:
        _check_autobit(cfg.autobit, backbone, int(pretrain_config.get("image_size") or 32))  # type: ignore[union-attr]
    cfg.bits = bits
    return _sourced_spec(cfg, source_dataset, EVAL_SERVER_FIELDS, body["source_job"])


def meta_backbone(pretrain_config: dict[str, Any]) -> Any:
    """The pretrain run's backbone on the meta device (names and shapes; no memory, no compute)."""
    import torch

    from ssql_core.models import build_backbone

    size = int(pretrain_config.get("image_size") or 32)
    stem = pretrain_config.get("stem") or "auto"
    if stem == "auto":
        stem = "cifar" if size <= 64 else "imagenet"
    with torch.device("meta"):
        return build_backbone(str(pretrain_config.get("backbone") or "resnet18"), stem, float(pretrain_config.get("width") or 1.0))


def _check_autobit(autobit: dict[str, Any], backbone: Any, image_size: int) -> None:
    from ssql_core.bitconfig import layer_table
    from ssql_core.mixed_precision.autobit import AutobitConfig, check_budget

    try:
        check_budget(layer_table(backbone, image_size), AutobitConfig.from_dict(autobit).validate())
    except ConfigError as e:
        raise FieldError(_loc(e.field, set()), e.reason) from None


def canonical_bits(loc: tuple[str, ...], values: list[Any], backbone: Any = None, labels: tuple[str, ...] = ()) -> list[Any]:
    """Bit-widths as their canonical strings (``"4W4F"`` -> ``"4w4a"``), per-layer maps as
    canonical ``{layer: "4w8a"}`` objects (checked against ``backbone`` when given), and the
    labels in ``labels`` (maps an evaluation ran) as they are; 422 naming ``loc[i]`` otherwise."""
    from ssql_core.bitconfig import BitConfig, is_label, parse_bits_spec, resolve

    out: list[Any] = []
    names: list[str] = []
    for i, b in enumerate(values):
        if is_label(b):
            if b not in labels:
                raise FieldError((*loc, i), f"{b} is the label of a per-layer configuration of an evaluation"
                                 + (f"; this eval job evaluated {list(labels)}" if labels else
                                    ": export it from the eval job that evaluated it, or give the map itself"))
            out.append(b)
            names.append(b)
            continue
        try:
            spec = parse_bits_spec(b)
            if isinstance(spec, BitConfig) and backbone is not None:
                resolve(spec, backbone)
        except ValueError as e:
            raise FieldError((*loc, i), str(e)) from None
        out.append(spec.as_dict() if isinstance(spec, BitConfig) else str(spec))
        names.append(str(spec))
    if len(set(names)) != len(names):
        raise FieldError(loc, f"bit-widths repeat: {names}")
    return out


def _sourced_spec(cfg: Any, source_dataset: str, server_fields: tuple[str, ...], source_job: str) -> dict[str, Any]:
    """``{"config", "source_job"}`` of a job that reads a pretrain: the dataset defaults to the
    pretrain's, and the fields only the server sets are left out of the stored spec."""
    if cfg.dataset is None:
        cfg.dataset = source_dataset
    config = cfg.to_dict()
    for name in server_fields:
        config.pop(name, None)
    return {"config": config, "source_job": source_job}


#: packed files a pretrain job writes after training unless its request says otherwise (SPEC 9)
DEFAULT_EXPORT_BITS: tuple[str, ...] = ("fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a")
#: the most bit-widths one request may ask for (every w, a in 2..8 plus fp)
MAX_EXPORT_BITS = 50
DISTILL_SERVER_FIELDS = (*SERVER_FIELDS, "checkpoint", "heads")


def bits_list(loc: tuple[str, ...], value: Any, allow_empty: bool, backbone: Any = None,
              labels: tuple[str, ...] | None = None) -> list[Any]:
    """Canonical bit-widths (``"4w4f"`` -> ``"4w4a"``) of a JSON list; 422 naming ``loc`` otherwise.
    With ``labels`` (an export), per-layer maps (checked against ``backbone``) and the labels of
    maps an evaluation ran are accepted too (:func:`canonical_bits`)."""
    maps_ok = labels is not None
    if not isinstance(value, list) or not all(isinstance(b, str) or (maps_ok and isinstance(b, dict)) for b in value):
        raise FieldError(loc, f"must be a list of bit-widths such as ['fp', '4w4a']{' or per-layer maps' if maps_ok else ''}, "
                         f"got {value!r}")
    if not value and not allow_empty:
        raise FieldError(loc, "give at least one bit-width")
    if len(value) > MAX_EXPORT_BITS:
        raise FieldError(loc, f"at most {MAX_EXPORT_BITS} bit-widths per request, got {len(value)}")
    if maps_ok:
        return canonical_bits(loc, value, backbone, labels or ())
    out = []
    for i, b in enumerate(value):
        try:
            out.append(str(parse_bits(b)))
        except ValueError as e:
            raise FieldError((*loc, i), str(e)) from None
    if len(set(out)) != len(out):
        raise FieldError(loc, f"bit-widths repeat: {out}")
    return out


def split_export_bits(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Take ``export_bits`` out of a pretrain request: (rest of the body, validated bit-widths)."""
    rest = dict(body)
    if "export_bits" not in rest or rest["export_bits"] is None:
        rest.pop("export_bits", None)
        return rest, list(DEFAULT_EXPORT_BITS)
    return rest, bits_list(("body", "export_bits"), rest.pop("export_bits"), allow_empty=True)


def export_spec(body: dict[str, Any], source: Any, width: float | None, pretrain_config: dict[str, Any] | None = None,
                evaluated: list[str] | None = None) -> dict[str, Any]:
    """Validated export spec ``{"config": {"bits", "formats"}, "source_job", "source_kind", "pretrain_job"}``.

    ``source`` is the (succeeded) pretrain or eval job whose files are written. From an eval job
    the files are classifiers (backbone + that evaluation's linear head), so only bit-widths it
    evaluated with the linear protocol can be exported from it (``evaluated``: its result rows'
    bits, per-layer maps by their label). ``width`` is the pretrain run's width multiplier
    (torchvision files need 1); ``pretrain_config`` lets per-layer maps be checked against its
    backbone.
    """
    from ssql_core.config import CALIBRATIONS
    from ssql_core.export import FORMATS

    accepted = ["bits", "formats", "calibration", "calib_percentile", "ptq", "ptq_images", "ptq_iters", "brecq_learn_act", "onnx_form"]
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        raise FieldError(("body", unknown[0]), f"unknown field; accepted: {accepted}")
    ptq = _export_ptq(body, source)
    calibration, percentile = body.get("calibration"), body.get("calib_percentile")
    if calibration is not None and calibration not in CALIBRATIONS:
        raise FieldError(("body", "calibration"), f"must be one of {list(CALIBRATIONS)}, got {calibration!r}")
    if percentile is not None and (isinstance(percentile, bool) or not isinstance(percentile, (int, float))
                                   or not 50.0 <= percentile <= 100.0):
        raise FieldError(("body", "calib_percentile"), f"must be a number between 50 and 100, got {percentile!r}")
    config = source["spec"]["config"]
    evaluated_bits = list(evaluated if evaluated is not None else config.get("bits", [])) if source["kind"] == "eval" else []
    backbone = meta_backbone(pretrain_config) if pretrain_config is not None else None
    bits = bits_list(("body", "bits"), body.get("bits"), allow_empty=False, backbone=backbone,
                     labels=tuple(b for b in evaluated_bits if isinstance(b, str)))
    names = [bits_name(b) for b in bits]
    formats = body.get("formats", ["safetensors"])
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise FieldError(("body", "formats"), f"must be a non-empty list of formats out of {list(FORMATS)}, got {formats!r}")
    for i, f in enumerate(formats):
        if f not in FORMATS:
            raise FieldError(("body", "formats", i), f"unknown format {f!r}; known: {list(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise FieldError(("body", "formats"), f"formats repeat: {formats}")
    if "torchvision" in formats:
        if bits != ["fp"]:
            raise FieldError(("body", "formats"), "the torchvision format holds FP weights only: ask for bits ['fp'] alone")
        if width is not None and float(width) != 1.0:
            raise FieldError(("body", "formats"), f"torchvision models have no width multiplier; this run has width {width}")
    if source["kind"] == "finetune":
        if names != [config["bits"]]:
            raise FieldError(("body", "bits"), f"the finetune job trained a classifier at {config['bits']} only: ask for bits ['{config['bits']}']")
        if not set(formats) <= {"safetensors", "onnx"}:
            raise FieldError(("body", "formats"), "a fine-tuned classifier exports as safetensors or onnx")
        if calibration is not None or percentile is not None:
            raise FieldError(("body", "calibration"), "a fine-tuned classifier keeps the activation ranges it was trained with")
    if source["kind"] == "eval":
        if config.get("protocol", "linear") != "linear":
            raise FieldError(("body", "bits"), "a kNN evaluation trained no linear heads: export from its pretrain job instead")
        have = [bits_name(b) for b in evaluated_bits]
        missing = [n for n in names if n not in have]
        if missing:
            raise FieldError(("body", "bits"), f"the eval job trained heads at {have} only, not at {missing}; "
                             "export the backbone from its pretrain job instead")
    onnx_form = _onnx_form(body.get("onnx_form"), formats, source["kind"])
    pretrain_job = source["id"] if source["kind"] == "pretrain" else source["source_job_id"]
    if ptq and ptq.get("ptq") not in (None, "calibrate") and "torchvision" in formats:
        raise FieldError(("body", "ptq"), "the torchvision format holds FP weights: reconstruction applies to quantized files")
    return {"config": {"bits": bits, "formats": formats, "calibration": calibration, "calib_percentile": percentile, **ptq,
                       **({"onnx_form": onnx_form} if onnx_form is not None else {})},
            "source_job": source["id"], "source_kind": source["kind"], "pretrain_job": pretrain_job}


def _onnx_form(value: Any, formats: list[str], source_kind: str) -> str | None:
    """The ONNX graph's form an export asks for (``ssql_core.export.onnx_graph.FORMS``), if any."""
    from ssql_core.export.onnx_graph import FORMS

    if value is None:
        return None
    if value not in FORMS:
        raise FieldError(("body", "onnx_form"), f"must be one of {list(FORMS)}, got {value!r}")
    if "onnx" not in formats:
        raise FieldError(("body", "onnx_form"), "a form of the ONNX graph needs 'onnx' in formats")
    if source_kind == "finetune":
        raise FieldError(("body", "onnx_form"), "a fine-tuned classifier's ONNX file has one form (its own graph): leave onnx_form out")
    return str(value)


def bits_name(b: Any) -> str:
    """A canonical ``bits`` entry's name: the string, or a map's label."""
    from ssql_core.bitconfig import parse_bit_config

    return parse_bit_config(b).label if isinstance(b, dict) else str(b)


def _export_ptq(body: dict[str, Any], source: Any) -> dict[str, Any]:
    """The reconstruction fields of an export request (only those given), validated by ssql_core's
    EvalConfig rules; from an eval job only its own ``ptq`` (the head was trained on that model)."""
    given = {k: body[k] for k in ("ptq", "ptq_images", "ptq_iters", "brecq_learn_act") if k in body and body[k] is not None}
    if not given:
        return {}
    if source["kind"] == "finetune":
        raise FieldError(("body", next(iter(given))), "a fine-tuned classifier keeps the weights it was trained with")
    try:
        EvalConfig(**{"ptq": "calibrate", **given}).validate()
    except ConfigError as e:
        raise FieldError(("body", e.field), e.reason) from None
    if source["kind"] == "eval":
        own = source["spec"]["config"].get("ptq", "calibrate")
        if set(given) - {"ptq"} or given.get("ptq", own) != own:
            raise FieldError(("body", "ptq"), f"the eval job's heads were trained on its own {own!r} model, which its classifier "
                             "files reproduce: export from the pretrain job for another ptq")
    return given


FINETUNE_SERVER_FIELDS = (*SERVER_FIELDS, "checkpoint")


def finetune_spec(body: dict[str, Any], settings: Settings, source_dataset: str) -> dict[str, Any]:
    """Validated finetune spec ``{"config": {...}, "source_job": pretrain id}``; ``dataset``
    defaults to the pretrain run's (another one is a transfer: its classes set the head)."""
    from ssql_core.finetune import FinetuneConfig

    data = {k: v for k, v in body.items() if k not in ("kind", "source_job")}
    _reject_server_fields(data, FINETUNE_SERVER_FIELDS)
    cfg = _validated(FinetuneConfig, data, settings, caps={"epochs": settings.max_epochs, "batch_size": settings.max_batch_size},
                     checkpoint="-")
    cfg.bits = str(parse_bits(cfg.bits))
    _limit(("body", "epochs"), cfg.epochs, settings.max_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    return _sourced_spec(cfg, source_dataset, FINETUNE_SERVER_FIELDS, body["source_job"])


def distill_spec(body: dict[str, Any], settings: Settings, source: Any) -> dict[str, Any]:
    """Validated distill spec ``{"config": {...}, "source_job": eval id, "pretrain_job": its source}``.

    ``source`` is the eval job (already checked to be the owner's, an eval, and succeeded); its
    ``heads.pt`` must hold an ``fp`` head, i.e. the evaluation ran the linear protocol with "fp".
    """
    from ssql_core.distill import DistillConfig

    data = {k: v for k, v in body.items() if k not in ("kind", "source_job")}
    _reject_server_fields(data, DISTILL_SERVER_FIELDS)
    econfig = source["spec"]["config"]
    if econfig.get("protocol", "linear") != "linear" or "fp" not in econfig.get("bits", []):
        raise FieldError(("body", "source_job"), f"the eval job has no 'fp' linear head (bits {econfig.get('bits')}, protocol "
                         f"{econfig.get('protocol')!r}): distillation's teacher is the FP model with that head; "
                         "evaluate with 'fp' among the bits and the linear protocol")
    cfg = _validated(DistillConfig, data, settings, caps={"epochs": settings.max_epochs, "batch_size": settings.max_batch_size},
                     checkpoint="<server>", heads="<server>")
    _limit(("body", "epochs"), cfg.epochs, settings.max_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    cfg.bits = str(parse_bits(cfg.bits))
    if cfg.dataset is None:
        cfg.dataset = econfig.get("dataset")
    config = cfg.to_dict()
    for name in DISTILL_SERVER_FIELDS:
        config.pop(name, None)
    return {"config": config, "source_job": source["id"], "pretrain_job": source["source_job_id"]}
