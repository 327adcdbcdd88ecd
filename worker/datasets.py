"""Uploaded datasets on a worker (decision 018): the supervisor looks the dataset up (it has the
database), the runner fetches it from the object store into the host's cache and hands ssql_core
a plain image folder (``imagefolder:<sha256>`` under the cache), ssql_core never knowing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from persistence import dataset_store
from persistence.job_store import ClaimedJob


def dataset_input(Sessions: sessionmaker[Session], job: ClaimedJob, config: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(what the runner fetches, None) for a job on ``upload:<id>``, (None, final error) when the
    dataset is gone, (None, None) for any other dataset."""
    dataset_id = dataset_store.upload_id(config.get("dataset"))
    if dataset_id is None:
        return None, None
    with Sessions() as s:
        row = dataset_store.for_job(s, job.id, dataset_id)
        if row is None or row.status != "ready" or not row.storage_key:
            return None, {"code": "missing_dataset", "field": "dataset",
                          "message": f"dataset {dataset_id} was deleted (or is no longer ready): upload it again"}
        return {"name": config["dataset"], "key": row.storage_key, "sha256": row.sha256, "format": row.format}, None


def fetch(source: dict[str, Any], config: dict[str, Any]) -> bool:
    """In the runner: make the dataset local (verified, cached) and point ``config`` at it; True
    when it was downloaded now, False when the cache had it. Pins it against eviction for the
    life of this process."""
    from persistence.settings import get_settings
    from storage import store_for
    from storage.archives import Limits
    from storage.cache import DatasetCache

    settings = get_settings()
    cache = DatasetCache(settings.resolved_cache_dir(), settings.cache_max_bytes)
    _pins.append(cache.pin(source["sha256"]))
    limits = Limits(settings.dataset_max_entries, settings.dataset_max_unpacked_bytes, settings.dataset_max_ratio)
    _, downloaded = cache.ensure(store_for(settings), source["key"], source["sha256"], source["format"], limits)
    config["dataset"] = f"imagefolder:{source['sha256']}"
    config["data_root"] = str(cache.root)
    return downloaded


_pins: list[object] = []


def rename_back(out: dict[str, Any], source: dict[str, Any]) -> None:
    """Results name the dataset as the user did (``upload:<id>``), not by its cache folder."""
    local = f"imagefolder:{source['sha256']}"
    for holder in [out.get("summary") or {}, *(out.get("results") or [])]:
        if isinstance(holder, dict) and holder.get("dataset") == local:
            holder["dataset"] = source["name"]
