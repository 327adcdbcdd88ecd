"""Queries on uploaded datasets (decision 018): the API's (asyncio) and the worker's lookup.

Ownership is a filter, as for jobs: another owner's dataset is indistinguishable from a missing one.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import RowMapping, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from persistence.db import utcnow
from persistence.models import Dataset, Job

#: ``"dataset": "upload:<id>"`` in a job request names an uploaded dataset
UPLOAD_PREFIX = "upload:"
ACTIVE_JOB_STATUSES = ("queued", "running")


def upload_id(dataset: object) -> str | None:
    """The dataset id of an ``upload:<id>`` name, else None."""
    if isinstance(dataset, str) and dataset.startswith(UPLOAD_PREFIX):
        return dataset[len(UPLOAD_PREFIX):]
    return None


def storage_key(owner_id: int, sha256: str, fmt: str) -> str:
    return f"datasets/{owner_id}/{sha256}.{fmt}"


async def get(conn: AsyncConnection, owner_id: int, dataset_id: str) -> RowMapping | None:
    if not (isinstance(dataset_id, str) and 0 < len(dataset_id) <= 36 and dataset_id.isascii() and dataset_id.isprintable()):
        return None
    row = (await conn.execute(select(Dataset.__table__).where(Dataset.id == dataset_id, Dataset.owner_id == owner_id))).mappings().first()
    return row


async def usage_bytes(conn: AsyncConnection, owner_id: int) -> int:
    """Bytes of the owner's archives that count against the quota (ready or validating)."""
    stmt = select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.owner_id == owner_id, Dataset.status != "invalid")
    return int((await conn.execute(stmt)).scalar_one())


async def create_or_existing(conn: AsyncConnection, owner_id: int, name: str, sha256: str, size: int,
                             fmt: str) -> tuple[RowMapping, bool]:
    """Insert a ``validating`` dataset, or find the owner's dataset with this sha256; (row, created?).

    One statement decides between concurrent uploads of one archive (the unique (owner, sha256)
    constraint). A dataset of the same archive that is ``invalid`` is taken over and validated
    again (its failure may have been the store's, not the archive's)."""
    now = utcnow()
    values = {"id": str(uuid.uuid4()), "owner_id": owner_id, "name": name, "sha256": sha256, "bytes": size, "format": fmt,
              "status": "validating", "created_at": now, "updated_at": now}
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(Dataset).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["owner_id", "sha256"],
        set_={"status": "validating", "name": name, "format": fmt, "error": None, "updated_at": now},
        where=Dataset.__table__.c.status == "invalid",
    ).returning(Dataset.id)
    got = (await conn.execute(stmt)).first()
    await conn.commit()
    if got is not None:
        row = (await conn.execute(select(Dataset.__table__).where(Dataset.id == got[0]))).mappings().one()
        return row, True
    row = (await conn.execute(select(Dataset.__table__).where(Dataset.owner_id == owner_id, Dataset.sha256 == sha256))).mappings().one()
    return row, False


async def create_registration(conn: AsyncConnection, owner_id: int, name: str, uri: str, fmt: str, size: int) -> RowMapping:
    """A ``validating`` dataset read from ``uri``: its sha256 is set once its content is read
    (:func:`finish_validation`), so two registrations never collide before then."""
    now = utcnow()
    values = {"id": str(uuid.uuid4()), "owner_id": owner_id, "name": name, "sha256": None, "bytes": size, "format": fmt,
              "status": "validating", "source_uri": uri, "created_at": now, "updated_at": now}
    await conn.execute(Dataset.__table__.insert().values(**values))
    await conn.commit()
    return (await conn.execute(select(Dataset.__table__).where(Dataset.id == values["id"]))).mappings().one()


async def same_content(conn: AsyncConnection, owner_id: int, sha256: str, dataset_id: str) -> RowMapping | None:
    """The owner's other dataset (ready or validating) with this sha256, if any."""
    stmt = select(Dataset.__table__).where(Dataset.owner_id == owner_id, Dataset.sha256 == sha256, Dataset.id != dataset_id,
                                           Dataset.status != "invalid")
    return (await conn.execute(stmt)).mappings().first()


async def finish_validation(conn: AsyncConnection, dataset_id: str, **values: Any) -> bool:
    """Record the outcome of a validation (``status`` ready or invalid); False if the row is gone.
    Setting a ``sha256`` (a registration's) first removes the owner's invalid dataset of it (it
    holds nothing); one ready or validating raises IntegrityError (the unique (owner, sha256))."""
    if values.get("sha256"):
        owner = select(Dataset.owner_id).where(Dataset.id == dataset_id).scalar_subquery()
        await conn.execute(delete(Dataset).where(Dataset.owner_id == owner, Dataset.sha256 == values["sha256"],
                                                 Dataset.id != dataset_id, Dataset.status == "invalid"))
    stmt = (update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "validating")
            .values(updated_at=utcnow(), **values).returning(Dataset.id))
    done = (await conn.execute(stmt)).first() is not None
    await conn.commit()
    return done


async def expire_stale(conn: AsyncConnection, owner_id: int, timeout_s: float) -> None:
    """Datasets of the owner ``validating`` for longer than ``timeout_s`` become ``invalid``: their
    validation (a background step of an API process) was lost with that process."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stmt = (update(Dataset).where(Dataset.owner_id == owner_id, Dataset.status == "validating", Dataset.updated_at < cutoff)
            .values(status="invalid", updated_at=utcnow(),
                    error=f"the validation did not finish within {timeout_s:g} s (the API process that ran it stopped?): "
                          "upload the archive again"))
    if (await conn.execute(stmt)).rowcount:
        await conn.commit()
    else:
        await conn.rollback()


async def list_for(conn: AsyncConnection, owner_id: int, status: str | None, limit: int, offset: int) -> list[RowMapping]:
    stmt = select(Dataset.__table__).where(Dataset.owner_id == owner_id)
    if status:
        stmt = stmt.where(Dataset.status == status)
    stmt = stmt.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit).offset(offset)
    return list((await conn.execute(stmt)).mappings().all())


async def jobs_using(conn: AsyncConnection, owner_id: int, dataset_id: str) -> list[str]:
    """Ids of the owner's queued or running jobs whose spec names ``upload:<id>``."""
    stmt = select(Job.id, Job.spec).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    name = UPLOAD_PREFIX + dataset_id
    return [r.id for r in (await conn.execute(stmt)) if ((r.spec or {}).get("config") or {}).get("dataset") == name]


async def remove(conn: AsyncConnection, owner_id: int, dataset_id: str) -> None:
    await conn.execute(delete(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == owner_id))
    await conn.commit()


def for_job(session: Session, job_id: str, dataset_id: str) -> Dataset | None:
    """The worker's lookup: the dataset of the job's owner (ready or not; the caller checks)."""
    owner = select(Job.owner_id).where(Job.id == job_id).scalar_subquery()
    return session.execute(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == owner)).scalar_one_or_none()
