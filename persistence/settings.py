"""The one settings class of the service (environment prefix ``SSQL_``).

API, worker, CLI and migrations all read the same class so that an embedded install (everything
under ``SSQL_HOME``) and a production install (Postgres + Redis URLs) differ only by environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server, worker and client settings. Paths default to folders under ``home``."""

    model_config = SettingsConfigDict(env_prefix="SSQL_", extra="ignore")

    home: Path = Field(Path("./var"), description="root of the embedded database, broker and artifacts")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under home")
    broker_url: str | None = Field(None, description="Celery broker URL; default a filesystem transport under home")
    artifacts_dir: Path | None = Field(None, description="job workdirs and checkpoints; default home/artifacts")
    data_root: Path | None = Field(None, description="datasets and imagefolder roots; default home/data")
    #: the object store (storage/): ``file:///path`` or ``s3://bucket/prefix``; default home/store
    storage_url: str | None = None
    #: S3 endpoint, region and credentials; None: boto3's own chain (AWS_ENDPOINT_URL, AWS_REGION,
    #: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, profiles)
    aws_endpoint_url: str | None = None
    aws_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    #: files above this many bytes go to S3 as a multipart upload (parts of this size, at least 5 MiB)
    storage_multipart_bytes: int = Field(8 << 20, ge=5 << 20)
    #: the S3 endpoint clients reach (presigned download URLs are signed for it, e.g. MinIO's published
    #: port); default the endpoint the server itself uses
    storage_public_endpoint_url: str | None = None
    #: downloads answer 307 to a presigned URL of the stored object (an S3 store only), HEAD too
    download_redirect: bool = False
    #: how long such a URL reads the object
    download_redirect_seconds: int = Field(300, ge=1, le=7 * 24 * 3600)
    #: how often a running attempt's log is copied to the store (with SSQL_STORAGE_URL set): what an
    #: API on another host shows of a job that is running
    log_mirror_seconds: float = Field(5.0, gt=0)
    #: a worker's local cache of datasets fetched from the store (content-addressed, LRU); default home/cache
    cache_dir: Path | None = None
    cache_max_bytes: int = Field(20 << 30, ge=0)
    #: the API's copies of files it fetched from the store to serve them (content-addressed, in
    #: cache_dir/fetched, least recently served evicted beyond this)
    api_fetched_max_bytes: int = Field(10 << 30, ge=0)

    # Uploaded datasets (POST /v1/datasets; decision 018).
    #: the largest archive one upload may send (413 above it)
    max_upload_bytes: int = Field(2 << 30, ge=1)
    #: bytes of archives one owner may keep (ready or validating datasets); None: no limit
    max_dataset_bytes_per_owner: int | None = Field(None, ge=0)
    #: zip-bomb limits of an archive: entries, bytes once unpacked, unpacked / packed ratio
    dataset_max_entries: int = Field(200_000, ge=1)
    dataset_max_unpacked_bytes: int = Field(16 << 30, ge=1)
    dataset_max_ratio: float = Field(100.0, gt=1)
    #: buckets users may register datasets from (``POST /v1/datasets`` with ``{"uri": "s3://bucket/..."}``),
    #: comma-separated; ``*``: any bucket the server's credentials can read; empty: none. Read with the
    #: store's endpoint and credentials; the service's own store prefix is never registrable.
    dataset_uri_buckets: str = ""
    #: a dataset still ``validating`` this long after its upload is reported ``invalid`` (its
    #: validation was lost with an API process); the same archive may then be uploaded again
    dataset_validation_timeout_seconds: float = Field(3600.0, gt=0)

    # What the server accepts (also shown by GET /v1/catalog).
    max_epochs: int = 1000
    max_eval_epochs: int = 1000
    max_batch_size: int = 4096
    max_image_size: int = 512
    max_bits_per_eval: int = 16
    #: the most devices (GPUs, or gloo CPU processes on a worker without one) one pretrain job may ask for
    max_devices: int = 8
    allow_download: bool = False
    device: str = "auto"
    num_workers: int = 0
    #: CPU threads of a training process (0: torch's default). On a small shared CPU, 1 avoids
    #: OpenMP oversubscription that can slow training by an order of magnitude.
    torch_threads: int = 0

    # Quotas per owner (defaults; ``ssql owners set-quota`` sets an owner's own). None: no limit.
    #: queued + running jobs of one owner at once; a submit over it is refused (429)
    quota_max_active_jobs: int | None = Field(None, ge=0)
    #: running jobs of one owner at once; further jobs wait in the queue
    quota_max_running_jobs: int | None = Field(None, ge=0)
    #: devices held at once by one owner's running jobs; further jobs wait (a job asking more: 403)
    quota_max_devices: int | None = Field(None, ge=0)
    #: device-hours one owner may use per ``quota_period_hours`` (rolling); a submit over it: 403
    quota_device_hours: float | None = Field(None, ge=0)
    quota_period_hours: float = Field(168.0, gt=0)
    #: fair queueing (decision 019): an owner's past device-time counts half after this many hours
    fair_share_half_life_hours: float = Field(24.0, gt=0)

    # Admission by cost (ssql_core.cost; decision 014). None: no limit.
    #: a job estimated above this many device-hours is refused (422)
    max_job_device_hours: float | None = Field(None, gt=0)
    #: the largest device's memory (GB): a job estimated to need more per device is refused (422)
    max_device_memory_gb: float | None = Field(None, gt=0)
    #: sustained TFLOP/s of one device, what estimates divide by (a prior: set it to your devices')
    device_tflops: float = Field(10.0, gt=0)

    # Job execution.
    queue: str = "gpu"
    max_attempts: int = 3
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    cancel_grace_seconds: float = 10.0
    #: a graceful worker stop: how long the runner may train on to reach a checkpoint before it
    #: stops anyway (then SIGKILL after ``cancel_grace_seconds`` more). Keep the container's stop
    #: grace period above the sum (docker-compose.yml: stop_grace_period)
    handback_seconds: float = 60.0
    reconcile_seconds: float = 30.0
    stale_queued_seconds: float = 300.0
    #: above the longest job: Redis re-delivers an un-acked message after this many seconds
    visibility_timeout: int = 7 * 24 * 3600

    # API process.
    auth_cache_seconds: float = 30.0
    page_size_max: int = 200
    #: request bodies above this many bytes are refused with 413 before they are read (0: no limit)
    max_body_bytes: int = 1 << 20
    #: ``GET /metrics`` answers without an API key (a Prometheus on a private network); otherwise
    #: it needs one, like every other route
    metrics_public: bool = False

    # Client (ssql CLI).
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    def sync_database_url(self) -> str:
        """URL for the synchronous engine (worker, CLI, Alembic)."""
        url = self.database_url or f"sqlite:///{self.resolved_home() / 'ssql.db'}"
        if url.startswith(("postgres://", "postgresql://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    def async_database_url(self) -> str:
        """URL for the asyncio engine of the API (asyncpg or aiosqlite)."""
        url = self.sync_database_url()
        scheme, rest = url.split("://", 1)
        if scheme.startswith("postgresql"):
            return "postgresql+asyncpg://" + rest
        if scheme.startswith("sqlite"):
            return "sqlite+aiosqlite://" + rest
        return url

    def is_sqlite(self) -> bool:
        return self.sync_database_url().startswith("sqlite")

    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_dir(self) -> Path:
        return self.resolved_home() / "broker"

    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.resolved_home() / "artifacts").expanduser().resolve()

    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{self.resolved_home() / 'store'}"

    def storage_options(self) -> dict[str, object]:
        """Keyword arguments of the S3 backend (only the overrides that are set)."""
        return {"endpoint_url": self.aws_endpoint_url, "region": self.aws_region, "access_key_id": self.aws_access_key_id,
                "secret_access_key": self.aws_secret_access_key, "multipart_bytes": self.storage_multipart_bytes,
                "public_endpoint_url": self.storage_public_endpoint_url}

    def uri_buckets(self) -> set[str]:
        """``SSQL_DATASET_URI_BUCKETS`` as a set (``{"*"}``: any)."""
        return {b.strip() for b in self.dataset_uri_buckets.split(",") if b.strip()}

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.resolved_home() / "cache").expanduser().resolve()

    def resolved_data_root(self) -> Path:
        return (self.data_root or self.resolved_home() / "data").expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
