"""Database tables shared by the API and the worker (SQLAlchemy 2 declarative mapping).

A job is generic: ``kind`` plus a validated JSON ``spec``, so new kinds (distill, export) needed no
schema change. Everything a user sees about a job (status, progress, metrics, results,
artifacts) lives here, never in Celery's result backend.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_KINDS = ("pretrain", "eval", "distill", "export", "finetune")
#: kinds whose ``source_job`` is a pretrain job and which read its ``last.pt`` as ``config.checkpoint``
READS_PRETRAIN_CHECKPOINT = ("eval", "finetune")
#: torch: FP backbone state dict; safetensors: packed per bit-width; onnx: QDQ graph; torchvision: FP
ARTIFACT_FORMATS = ("torch", "safetensors", "onnx", "torchvision")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class User(Base):
    """An owner of jobs; API keys authenticate as a user."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]


class ApiKey(Base):
    """An API key, stored as the sha256 of a high-entropy secret (never the secret itself)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    #: the owner's words for the key (``POST /v1/keys``, the dashboard's keys page); never the secret
    label: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class OwnerQuota(Base):
    """An owner's quotas, set by an operator (``ssql owners set-quota``). A null column is the
    server's default (``SSQL_QUOTA_*``); a negative one is "no limit" for this owner whatever the
    default (docs/decisions/014)."""

    __tablename__ = "owner_quotas"

    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    #: queued + running jobs at once (a submit over it: 429)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: running jobs at once (a worker leaves the next one queued until one ends)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: devices held at once by the owner's running jobs
    max_devices: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: device-hours per rolling period (a submit over it: 403)
    device_hours: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: the rolling period of ``device_hours``, in hours
    period_hours: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: fair-share weight (null: 1): an owner of weight 2 is served as if it had used half its
    #: device-time (decision 019)
    weight: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[datetime]


class DeviceThroughput(Base):
    """Sustained training TFLOP/s of one device kind, measured from finished pretrain jobs (their
    estimated FLOPs per image x the images/s they ran at); what cost estimates divide by."""

    __tablename__ = "device_throughput"

    device_kind: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: exponential moving average over the runs (weight 1/2 for the newest after the first)
    tflops: Mapped[float] = mapped_column(Float)
    runs: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]


def _claims_default(context: Any) -> int:
    """A row inserted with attempts already made has had as many claims (its lease token)."""
    return int(context.get_current_parameters().get("attempts") or 0)


class Job(Base):
    """One unit of work; the row, not the broker, decides who runs it (lease + attempt)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]]
    source_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: attempts spent (capped by ``max_attempts``); an attempt handed back at a graceful worker stop
    #: gives its attempt back
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: claims so far: the lease token. Every claim increments it; every write of a running
    #: attempt (heartbeat, checkpoint publish, outcome) is fenced on it (see job_store._fence)
    claims: Mapped[int] = mapped_column(Integer, default=_claims_default, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_until: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: the owner's words for the job (set at submit, edited with PATCH): a name, tags (also in
    #: job_tags, which the list filters on) and notes
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tags: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: sha256 of the job's ``last.pt`` as mirrored in the object store (``jobs/<id>/last-<sha256>.pt``)
    #: when ``SSQL_STORAGE_URL`` is set: an attempt on a host without the file resumes from it
    #: (decision 018)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: the owner's order of their own queued jobs (higher first; -100..100, default 0). Between
    #: owners the fair-share rule decides (persistence/fair_share.py, decision 019)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_until"),
    )


class JobTag(Base):
    """One tag of one job (the job row's ``tags`` in a table an index can serve: ``?tag=`` filters)."""

    __tablename__ = "job_tags"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_job_tags_owner_tag", "owner_id", "tag", "job_id"),)


class JobAttempt(Base):
    """One execution attempt of a job: which worker and process ran it, and how it ended."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resumed_from: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_attempt"),
        Index("ix_job_attempts_ended_at", "ended_at"),
    )


class JobMetric(Base):
    """One progress sample of a running job (loss, lr, images/s history)."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    lr: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime]

    __table_args__ = (Index("ix_job_metrics_job_id_id", "job_id", "id"),)


class JobResult(Base):
    """One result row of an evaluation job (one bit-width under one protocol)."""

    __tablename__ = "job_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    bits: Mapped[str] = mapped_column(String(16))
    protocol: Mapped[str] = mapped_column(String(16))
    top1: Mapped[float | None] = mapped_column(Float, nullable=True)
    row: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    #: a job's rows, and ``GET /v1/jobs?sort=top1:<bits>`` (one job's top-1 at one bit-width) read
    #: from the index alone (migration 0012; bench/list_latency.py)
    __table_args__ = (Index("ix_job_results_job_bits_top1", "job_id", "bits", "top1"),)


class Artifact(Base):
    """A file a job produced (checkpoint at some bit-width and format), with its sha256."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    bits: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)  # relative to the artifacts directory
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    #: the job that wrote the file when it is served under another one (an export job), else null
    produced_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("job_id", "bits", "format", name="uq_artifacts_job_bits_format"),)


class Worker(Base):
    """A Celery worker as it last reported itself (worker/presence.py, every few seconds): what the
    status page and ``/metrics`` show as the workers seen. ``processes`` are the names its pool
    processes run jobs under (``host:pid``, what ``jobs.worker`` holds): its current jobs."""

    __tablename__ = "workers"

    #: Celery's node name (``-n gpu0@%h``), unique per running worker
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(JSON)
    #: e.g. ``NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC 7B13``
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    concurrency: Mapped[int] = mapped_column(Integer)
    processes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    #: set by a clean stop; a worker whose heartbeat stops without it was lost
    stopped_at: Mapped[datetime | None]


DATASET_STATUSES = ("validating", "ready", "invalid")


class Dataset(Base):
    """An image-folder archive an owner uploaded (decision 018). Content-addressed per owner: the
    archive's sha256 is unique per owner, so the same archive sent twice is one dataset. Its
    object is in the store under ``storage_key`` once it is ``ready`` (never while validating or
    when invalid)."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    #: None only while a dataset registered from a URI is validating (its content is not read yet)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: where a registered dataset was read from (``s3://bucket/prefix/``); None for an upload
    source_uri: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    #: "zip", "tar" or "tar.gz"
    format: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    classes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    train_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    val_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("owner_id", "sha256", name="uq_datasets_owner_sha256"),
        Index("ix_datasets_owner_created", "owner_id", "created_at"),
    )
