"""Database rows -> JSON-ready dicts (built by hand: the status route is hot, pydantic is not free)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from api.redact import redact
from persistence.db import as_utc

_PROGRESS_KEYS = ("phase", "fraction", "epoch", "epochs", "step", "total_steps", "images_per_s", "eta_s", "loss", "lr")
_EMPTY_PROGRESS = dict.fromkeys(_PROGRESS_KEYS) | {"fraction": 0.0, "epoch": 0, "step": 0}


def _ts(value: datetime | None) -> str | None:
    v = as_utc(value)
    return None if v is None else v.isoformat()


def _error_view(error: Any) -> Any:
    """A job's error with no server path in its message (it may quote a log line; decision 014)."""
    if isinstance(error, dict) and isinstance(error.get("message"), str) and "/" in error["message"]:
        return {**error, "message": redact(error["message"])}
    return error


def job_view(row: Mapping[str, Any]) -> dict[str, Any]:
    progress = row["progress"]
    if progress is None:  # not started yet: every key present, so clients need no special case
        progress = {**_EMPTY_PROGRESS, "epochs": ((row["spec"] or {}).get("config") or {}).get("epochs")}
    if row["status"] == "succeeded":
        progress = {**progress, "fraction": 1.0}
    return {
        "id": row["id"],
        "kind": row["kind"],
        "status": row["status"],
        "spec": row["spec"],
        "source_job": row["source_job_id"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "cancel_requested": row["cancel_requested"],
        "progress": progress,
        "summary": row["summary"],
        "error": _error_view(row["error"]),
        "created_at": _ts(row["created_at"]),
        "updated_at": _ts(row["updated_at"]),
        "started_at": _ts(row["started_at"]),
        "finished_at": _ts(row["finished_at"]),
        "name": row.get("name"),
        "tags": row.get("tags") or [],
        "notes": row.get("notes"),
        "priority": row.get("priority") or 0,
    }


def metric_view(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "attempt": row["attempt"],
        "phase": row["phase"],
        "epoch": row["epoch"],
        "step": row["step"],
        "loss": row["loss"],
        "lr": row["lr"],
        "images_per_s": row["images_per_s"],
        "metrics": row["extra"],
        "at": _ts(row["created_at"]),
    }


def checkpoint_view(row: Mapping[str, Any], job_id: str) -> dict[str, Any]:
    return {
        "bits": row["bits"],
        "format": row["format"],
        "bytes": row["bytes"],
        "sha256": row["sha256"],
        "url": f"/v1/jobs/{job_id}/checkpoints/{row['bits']}?format={row['format']}",
        "produced_by": row["produced_by"],
        "created_at": _ts(row["created_at"]),
    }
