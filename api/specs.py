"""Turn a submitted job body into a validated, complete spec using ssql_core's own validation.

Fields the server decides (paths, device, downloads) cannot be set by a request; server limits
(max epochs, batch size, image size) are checked on top of the library's. Any problem raises
:class:`FieldError` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from api.errors import FieldError
from persistence.settings import Settings
from ssql_core.bits import parse_bits
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.errors import ConfigError

#: config fields only the server sets; a request naming them is rejected
SERVER_FIELDS = ("data_root", "allow_download", "device", "num_workers")
EVAL_SERVER_FIELDS = (*SERVER_FIELDS, "checkpoint")


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


def pretrain_spec(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Validated pretrain spec ``{"config": {...}}`` with every default filled in."""
    from ssql_core.methods import METHODS

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
    try:
        cfg = PretrainConfig.from_dict(data)
        cfg.data_root = str(settings.resolved_data_root())
        cfg.allow_download = settings.allow_download
        cfg.validate()
    except ConfigError as e:
        raise FieldError(_loc(e.field, set(extras)), e.reason) from None
    except TypeError as e:
        raise FieldError(("body",), str(e)) from None
    _limit(("body", "epochs"), cfg.epochs, settings.max_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    _limit(("body", "image_size"), cfg.image_size, settings.max_image_size)
    config = cfg.to_dict()
    for name in SERVER_FIELDS:
        config.pop(name, None)
    return {"config": config}


def eval_spec(body: dict[str, Any], settings: Settings, source_dataset: str) -> dict[str, Any]:
    """Validated eval spec ``{"config": {...}, "source_job": id}``; bit-widths are canonicalised."""
    data = {k: v for k, v in body.items() if k not in ("kind", "source_job")}
    _reject_server_fields(data, EVAL_SERVER_FIELDS)
    try:
        cfg = EvalConfig.from_dict(data)
        cfg.data_root = str(settings.resolved_data_root())
        cfg.allow_download = settings.allow_download
        cfg.validate()
    except ConfigError as e:
        raise FieldError(_loc(e.field, set()), e.reason) from None
    except TypeError as e:
        raise FieldError(("body",), str(e)) from None
    bits = [str(parse_bits(b)) for b in cfg.bits]
    if len(bits) > settings.max_bits_per_eval:
        raise FieldError(("body", "bits"), f"at most {settings.max_bits_per_eval} bit-widths per job, got {len(bits)}")
    if len(set(bits)) != len(bits):
        raise FieldError(("body", "bits"), f"bit-widths repeat: {bits}")
    _limit(("body", "epochs"), cfg.epochs, settings.max_eval_epochs)
    _limit(("body", "batch_size"), cfg.batch_size, settings.max_batch_size)
    cfg.bits = bits
    if cfg.dataset is None:
        cfg.dataset = source_dataset
    config = cfg.to_dict()
    for name in EVAL_SERVER_FIELDS:
        config.pop(name, None)
    return {"config": config, "source_job": body["source_job"]}
