"""All configuration, from ``GRAFT_*`` environment variables. Only configuration differs
between the embedded default (SQLite, local folder, filesystem broker) and production."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
# Set by `graft serve` in its worker's environment: the pid of the process serving the API.
SERVE_PARENT = "GRAFT_SERVE_PARENT_PID"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./var")
    database_url: str | None = Field(None, description="default: SQLite in data_dir")
    broker_url: str | None = Field(None, description="default: a filesystem queue in data_dir")
    storage_url: str | None = Field(None, description="default: data_dir/artifacts; or s3://…")
    s3_endpoint_url: str | None = Field(None, description="for MinIO and other S3 servers")
    s3_region: str | None = None
    # Local copies of S3 objects (datasets, weights) kept in data_dir/cache, at most this many
    # MiB; the least recently used go first.
    s3_cache_mb: int = Field(10240, ge=0)

    max_upload_bytes: int = 2048 * MiB
    max_archive_members: int = 200_000
    max_member_bytes: int = 64 * MiB
    max_extracted_bytes: int = 16 * 1024 * MiB
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 64_000_000
    # A model a user sends is opened, run and written out in a process of its own with these
    # limits (address space, wall clock); past one, the registration is refused (422).
    model_check_memory_bytes: int = Field(16 * 1024 * MiB, ge=1024 * MiB)
    model_check_timeout_s: float = Field(300.0, gt=0)
    # Datasets registered by reference (POST /v1/datasets {"source"|"manifest": "s3://..."})
    # are copied from these buckets only (comma-separated), with the server's own S3
    # credentials; empty: importing by reference is off.
    import_buckets: str = ""
    import_threads: int = Field(16, ge=1, le=256)  # parallel GETs of one import
    import_lease_s: float = Field(30.0, gt=0)  # an import not renewed this long is taken over

    job_lease_s: float = Field(120.0, gt=0)
    # A running job's worker renews its lease, saves its progress and looks for a cancel
    # request and a full disk this often; less than half the lease.
    heartbeat_s: float = Field(1.0, gt=0)
    max_attempts: int = 3
    # A worker retries its final write this long (with backoff) while the database is away.
    db_retry_s: float = 120.0
    requeue_after_s: float = 600.0
    job_time_limit_s: float = 24 * 3600.0  # then the job stops and fails with code "timeout"
    job_time_grace_s: float = 600.0  # a worker silent past limit + grace: failed, not retried
    sweep_interval_s: float = 15.0
    webhook_secret: str | None = Field(None, description="default: a secret kept in data_dir")
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 5.0  # doubled after every failed delivery
    # Webhooks to private, loopback or link-local addresses (SSRF): allowed by default only
    # when the API itself listens on loopback (the single-user embedded mode).
    webhook_allow_private: bool | None = None
    device: str = "auto"
    extract_workers: int = 0
    # On a GPU: auto (bf16 from compute capability 8.0, fp16 with loss scaling below it), or
    # bf16, fp16 or fp32 (no autocast). CPUs run float32, or bf16 when it is asked for and
    # their matrix units take it (AMX, AVX512-BF16), for timm and torchvision backbones'
    # frozen passes (fine-tuning stays float32 there).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Where images are decoded, resized and normalised: auto (on a GPU: JPEGs by nvJPEG and
    # resized there, other files on threads; on a CPU: the extract_workers loader processes),
    # device (in the worker's process whatever the device) or loaders (the loader processes).
    decode: Literal["auto", "device", "loaders"] = "auto"
    # Images per pass of the backbone; a pass out of GPU memory is retried once at half of it.
    extract_batch_size: int = Field(64, ge=1, le=4096)
    # Cached features of a job beyond this many MiB are memory-mapped from files under tmp/.
    feature_memory_mb: int = Field(2048, ge=0)
    # Images decoded and resized to a model's input size, kept under decoded/ for the next job
    # or evaluation on the same dataset, at most this many MiB in all (0: none kept).
    decoded_cache_mb: int = Field(4096, ge=0)
    # Reference sets: images of a version's labels kept for later jobs (per label at most).
    reference_per_label: int = Field(100, ge=1, le=100_000)
    reference_selection: Literal["random", "herding"] = "random"
    # Fewer old-label images than this: retention is not measured, the version is unverified.
    min_retention_images: int = Field(20, ge=1)
    # Uploads that would leave less free disk under data_dir are refused (507); /readyz fails
    # and workers do not start jobs below it.
    min_free_disk_mb: int = Field(256, ge=0)
    # Seconds a stopping API waits for requests in flight (uploads) before closing them.
    shutdown_timeout_s: float = Field(30.0, ge=0)
    # Repeated polls of a job (or a page of jobs) within this window are answered from memory.
    poll_cache_s: float = Field(0.5, ge=0)
    # Temporary folders and stored objects that nothing owns are removed after this long.
    orphan_grace_s: float = Field(3600.0, ge=0)
    # How often the sweep looks for them; default: a quarter of the grace, at least a minute.
    janitor_interval_s: float | None = Field(None, ge=1)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_s * 2 > self.job_lease_s:
            raise ValueError(
                f"GRAFT_HEARTBEAT_S ({self.heartbeat_s:g}) must be at most half of "
                f"GRAFT_JOB_LEASE_S ({self.job_lease_s:g}), or a live job loses its lease"
            )
        return self

    @property
    def janitor_every_s(self) -> float:
        return self.janitor_interval_s or max(self.orphan_grace_s / 4, 60.0)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'graft.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir.resolve() / "artifacts").as_uri()

    @property
    def import_bucket_names(self) -> frozenset[str]:
        return frozenset(b.strip() for b in self.import_buckets.split(",") if b.strip())

    @property
    def queue_dir(self) -> Path:
        return self.data_dir.resolve() / "queue"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir.resolve() / "tmp"

    @property
    def decoded_dir(self) -> Path:
        return self.data_dir.resolve() / "decoded"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.queue_dir, self.tmp_dir):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
