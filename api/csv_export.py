"""Jobs' metric histories and result rows as CSV (``?format=csv``, ``/v1/compare/*.csv``).

Every sample, not the chart's downsampled points. One table per export, one row per sample (or
result), the job's id, name and kind on each row so several jobs fit in one file. Columns are the
fixed ones first, then every other key met (a method's own metrics, a result row's details) in
the order first met; a list or object is written as its JSON.

**Formula injection** (OWASP "CSV Injection"): a spreadsheet runs a cell that starts with ``=``,
``+``, ``-`` or ``@`` (and some a tab or carriage return) as a formula, and job names, tags and
notes are user-written. Every *text* cell starting with one of those gets a leading ``'``, which
spreadsheets show as text. Numbers are written as numbers and never prefixed: a loss of ``-0.93``
is a number to a spreadsheet, not a formula, and must stay one (docs/decisions/015).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi.responses import Response

from persistence.db import as_utc

#: a text cell starting with one of these is a formula to a spreadsheet
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MEDIA_TYPE = "text/csv; charset=utf-8"

METRIC_COLUMNS = ("job_id", "job_name", "job_kind", "sample_id", "attempt", "phase", "epoch", "step", "loss", "lr",
                  "images_per_s")
RESULT_COLUMNS = ("job_id", "job_name", "job_kind", "method", "source_job", "pretrain_job", "bits", "protocol", "top1",
                  "calibration", "probe", "quantizer")


def safe_text(text: str) -> str:
    """``text``, with a leading ``'`` when a spreadsheet would read it as a formula."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def cell(value: Any) -> Any:
    """A value as written in a cell: numbers as they are, text escaped, lists and objects as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, dict)):
        return safe_text(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return safe_text(str(value))


def write(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """The CSV text (RFC 4180: CRLF line ends, quotes where needed) of ``rows`` under ``columns``."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow([cell(c) for c in columns])
    for row in rows:
        w.writerow([cell(row.get(c)) for c in columns])
    return out.getvalue()


def _columns(fixed: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen = dict.fromkeys(fixed)
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _job_cells(job: Mapping[str, Any]) -> dict[str, Any]:
    return {"job_id": job["id"], "job_name": job.get("name"), "job_kind": job["kind"]}


def metrics_csv(jobs: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]) -> str:
    """``[(job row, its metric rows), ...]`` -> one CSV; ``metrics`` keys become ``metrics.<key>``
    columns, the sample's time the last column."""
    rows = []
    for job, samples in jobs:
        head = _job_cells(job)
        for m in samples:
            extra = m.get("extra") if isinstance(m.get("extra"), dict) else {}
            at = as_utc(m.get("created_at"))
            rows.append({**head, "sample_id": m["id"], "attempt": m["attempt"], "phase": m["phase"], "epoch": m["epoch"],
                         "step": m["step"], "loss": m["loss"], "lr": m["lr"], "images_per_s": m["images_per_s"],
                         **{f"metrics.{k}": v for k, v in extra.items()},
                         "at": None if at is None else at.isoformat()})
    columns = [c for c in _columns(METRIC_COLUMNS, rows) if c != "at"]
    return write([*columns, "at"], rows)


def results_csv(jobs: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]], str | None]]) -> str:
    """``[(job row, its result rows as the API answers them, the pretrain's method), ...]`` -> one
    CSV. ``calibration``, ``probe`` and ``quantizer`` come from the row, else the job's config."""
    rows = []
    for job, results, method in jobs:
        spec = job.get("spec") or {}
        config = spec.get("config") or {}
        head = {**_job_cells(job), "method": method, "source_job": job.get("source_job_id"),
                "pretrain_job": spec.get("pretrain_job") or (job.get("source_job_id") if job["kind"] in ("eval", "finetune") else None)}
        for r in results:
            from_config = {k: config.get(k) for k in ("calibration", "probe", "quantizer") if config.get(k) is not None}
            rows.append({**head, **from_config, **r})
    return write(_columns(RESULT_COLUMNS, rows), rows)


def csv_responses(what: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route answering CSV (200) for jobs that may not be the caller's (404)."""
    return {200: {"description": what, "content": {"text/csv": {"schema": {"type": "string"}}}},
            404: {"description": "a job named is not one of yours (`detail` names it)"}}


def csv_response(text: str, filename: str) -> Response:
    """A CSV answer, saved by a browser as ``filename``."""
    return Response(text, media_type=MEDIA_TYPE, headers={"Content-Disposition": f'attachment; filename="{filename}"'})
