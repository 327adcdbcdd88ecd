"""What the chart, CSV and compare routes read of a job: every metric sample, its result rows as
the API answers them, and the pretraining method they came from (owner-scoped)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from persistence import api_store

#: metric rows read per query while collecting a whole history
CHUNK = 5000


async def all_metrics(conn: AsyncConnection, job_id: str, after: int = 0) -> list[RowMapping]:
    """Every metric sample of the job with an id above ``after``, oldest first."""
    out: list[RowMapping] = []
    while True:
        rows = await api_store.metrics(conn, job_id, after, CHUNK)
        out += rows
        if len(rows) < CHUNK:
            return out
        after = rows[-1]["id"]


async def result_rows(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    """The job's result rows as ``GET /v1/jobs/{id}/results`` answers them."""
    return [{**r["row"], "bits": r["bits"], "protocol": r["protocol"], "top1": r["top1"]} for r in await api_store.results(conn, job_id)]


async def pretrain_method(conn: AsyncConnection, owner: int, job: Mapping[str, Any]) -> str | None:
    """The pretraining method of the pretrain job ``job`` is (or was made from)."""
    spec = job.get("spec") or {}
    if job["kind"] == "pretrain":
        return (spec.get("config") or {}).get("method")
    pretrain_id = spec.get("pretrain_job") or (job.get("source_job_id") if job["kind"] in ("eval", "finetune") else None)
    if pretrain_id is None:
        return None
    pretrain = await api_store.source_job(conn, owner, pretrain_id)
    return None if pretrain is None else ((pretrain["spec"] or {}).get("config") or {}).get("method")


#: a result row's size fields (decision 020), recorded by every evaluation since autobit
SIZE_FIELDS = ("model_bytes", "weight_bits_avg", "bops")


async def with_sizes(conn: AsyncConnection, owner: int, job: Mapping[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An eval job's rows, those written before sizes were recorded given ``model_bytes``,
    ``weight_bits_avg`` and ``bops`` as the evaluation computes them (``bitconfig.footprint`` on
    the pretrain's backbone, built on the meta device) and ``sizes_computed: true``, so that every
    evaluation can be drawn against model size. Other rows, and other kinds, are returned as they are."""
    if job["kind"] != "eval" or all("model_bytes" in r for r in rows):
        return rows
    pretrain_id = (job.get("spec") or {}).get("pretrain_job") or job.get("source_job_id")
    pretrain = await api_store.source_job(conn, owner, pretrain_id) if pretrain_id else None
    if pretrain is None:
        return rows
    pcfg = (pretrain["spec"] or {}).get("config") or {}
    table = await asyncio.to_thread(_layer_table, str(pcfg.get("backbone") or "resnet18"), str(pcfg.get("stem") or "auto"),
                                    float(pcfg.get("width") or 1.0), int(pcfg.get("image_size") or 32))
    from ssql_core.bitconfig import footprint
    from ssql_core.bits import parse_bits

    out = []
    for r in rows:
        if "model_bytes" not in r:
            try:
                bits = parse_bits(r["bits"])
            except ValueError:  # not a bit-width (only maps have labels, and their rows carry sizes)
                out.append(r)
                continue
            r = {**r, **footprint(table, bits), "sizes_computed": True}
        out.append(r)
    return out


@functools.lru_cache(maxsize=32)
def _layer_table(backbone: str, stem: str, width: float, image_size: int) -> Any:
    """The layer table of a pretrain's backbone (meta device: shapes only), kept per architecture."""
    from api.specs import meta_backbone
    from ssql_core.bitconfig import layer_table

    meta = meta_backbone({"backbone": backbone, "stem": stem, "width": width, "image_size": image_size})
    return layer_table(meta, image_size)
