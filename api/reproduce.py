"""The request that makes a job again, from its stored spec (``GET /v1/jobs/{id}/reproduce``).

A job's spec is its request validated, with every default filled in and the server's own fields
left out (api.specs). Submitting the spec's values back as a request therefore gives the same
spec: ``request`` is that body (every field), ``minimal`` the fields that differ from the
library's defaults (what a person would type), and ``cli`` the ``ssql submit`` command of
``minimal``. The service tests submit both (dry runs) and compare the specs, for every kind.

Left out: ``input_sha256`` (the server pins the source's files again at submission) and
``estimate`` (recomputed). Labels (name, tags, notes, priority) are no part of a spec and are not
copied. Compared with the library's defaults, not the presets' values: a field a preset decides
stays explicit, so a minimal request never depends on which preset the server applies.
docs/decisions/015.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

#: config fields the server writes into a spec at submission (not a request's)
SERVER_SET = ("input_sha256",)
#: the default of each export field an export spec stores (api.specs.export_spec)
EXPORT_DEFAULTS: dict[str, Any] = {"formats": ["safetensors"]}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def library_defaults(kind: str) -> dict[str, Any]:
    """The request fields' defaults of a job kind (the library config's, JSON-shaped)."""
    from api.specs import DEFAULT_EXPORT_BITS

    if kind == "export":
        return dict(EXPORT_DEFAULTS)
    if kind == "pretrain":
        from ssql_core.config import PretrainConfig as cls
    elif kind == "eval":
        from ssql_core.config import EvalConfig as cls  # type: ignore[assignment]
    elif kind == "distill":
        from ssql_core.distill import DistillConfig as cls  # type: ignore[assignment]
    else:
        from ssql_core.finetune import FinetuneConfig as cls  # type: ignore[assignment]
    defaults = _plain(cls().to_dict())
    if kind == "pretrain":
        defaults["export_bits"] = list(DEFAULT_EXPORT_BITS)
    return defaults


def source_of(job: Mapping[str, Any]) -> str | None:
    """The job a request names as its source (None for a pretrain)."""
    spec = job.get("spec") or {}
    return spec.get("source_job") or job.get("source_job_id")


def request_of(job: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of the request body that reproduces ``job``'s spec (a job row: kind, spec, source_job_id)."""
    kind, spec = job["kind"], job.get("spec") or {}
    config = {k: v for k, v in (spec.get("config") or {}).items() if k not in SERVER_SET and v is not None}
    if kind == "export":
        return config
    if not config.get("method_options"):
        config.pop("method_options", None)
    body: dict[str, Any] = {"kind": kind}
    if kind == "pretrain":
        body.update(config)
        body["export_bits"] = list(spec.get("export_bits") or [])
    else:
        body["source_job"] = source_of(job)
        body.update(config)
    return body


def minimal_of(job: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of :func:`request_of` whose value differs from the library's default (kind and
    source always kept)."""
    defaults = library_defaults(job["kind"])
    return {k: v for k, v in request_of(job).items()
            if k in ("kind", "source_job") or k not in defaults or _plain(v) != defaults[k]}


def _arg(value: Any) -> str:
    """A ``--set`` value as the CLI reads it back (JSON, or the text itself where JSON would not parse)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value  # plain text: `--set dataset=cifar10`
    return json.dumps(value, separators=(",", ":"))


def cli_of(job: Mapping[str, Any]) -> str:
    """The ``ssql submit`` command of :func:`minimal_of` (one ``--set`` per field)."""
    body = dict(minimal_of(job))
    kind = body.pop("kind", job["kind"])
    words = ["ssql", "submit", kind]
    source = body.pop("source_job", None) or (source_of(job) if kind == "export" else None)
    if source:
        words += ["--source-job", source]
    for name, value in body.items():
        words += ["--set", f"{name}={_arg(value)}"]
    return shlex.join(words)


def path_of(job: Mapping[str, Any]) -> str:
    """Where the request goes: ``/v1/jobs``, or an export's ``/v1/jobs/{source}/exports``."""
    return f"/v1/jobs/{source_of(job)}/exports" if job["kind"] == "export" else "/v1/jobs"


def reproduce(job: Mapping[str, Any]) -> dict[str, Any]:
    """``GET /v1/jobs/{id}/reproduce``'s answer."""
    return {"job_id": job["id"], "kind": job["kind"], "source_job": source_of(job) if job["kind"] != "pretrain" else None,
            "method": "POST", "path": path_of(job), "request": request_of(job), "minimal": minimal_of(job),
            "cli": cli_of(job), "cli_from": shlex.join(["ssql", "submit", "--from", job["id"]])}
