"""Tables. The jobs table is the source of truth for every job; the broker only carries ids."""

from __future__ import annotations

import enum
import os
import time
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, UTCDateTime, utcnow

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id() -> str:
    """A ULID: 26 characters that sort by creation time."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobKind(enum.StrEnum):
    EXPAND = "expand"  # a new version
    EVALUATE = "evaluate"  # versions scored on a dataset; nothing stored but the figures


class VersionStatus(enum.StrEnum):
    """What the gate (``engine.gate``) made of a version; only ``promoted`` versions
    become the latest on their own, the others by a promotion on purpose."""

    PROMOTED = "promoted"
    HELD = "held"  # measured, but the images cannot decide it: more would
    REJECTED = "rejected"
    UNVERIFIED = "unverified"  # retention could not be measured


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("owner", "name"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    latest_version: Mapped[int | None] = mapped_column(Integer)
    # The gate's settings for this model's jobs ({} or None: the defaults); a job may override.
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    # Loaded when read (a job's model is loaded with every job: it must not bring every
    # version along); listings ask for them with selectinload.
    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version"
    )
    promotions: Mapped[list[Promotion]] = relationship(
        order_by="Promotion.id.desc()", cascade="all, delete-orphan"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(26))
    architecture: Mapped[str] = mapped_column(String(200))
    labels: Mapped[list[str]] = mapped_column(JSON)
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.PROMOTED)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # {format: {key, sha256, size_bytes}}; safetensors is always there.
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The reference set: {"labels": {label: count}, "manifest": {key, sha256, size_bytes}}.
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # What its classifier layer was fitted on, for later jobs to measure out of fold
    # (``engine.lineage``): {key, sha256, size_bytes, folds, images}; None for a
    # registered version (nothing known) and versions made before lineages were kept.
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Bumped on every change of ``reference``: concurrent changes are refused, not lost.
    reference_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set when the version is deleted: its artifacts are gone, the row stays so that the
    # lineage of versions made from it stays readable.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")

    @property
    def reference_counts(self) -> dict[str, int]:
        return dict((self.reference or {}).get("labels", {}))


class Promotion(Base):
    """A version promoted (or rolled back to) on purpose, and by whom."""

    __tablename__ = "promotions"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer)
    previous_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[dict[str, int]] = mapped_column(JSON)
    num_images: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # "ready"; a dataset registered by reference is "importing" while it is copied in, then
    # "ready" or "failed" (``error``). ``source``: where it is copied from.
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, str] | None] = mapped_column(JSON)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    # "expand" (a new version) or "evaluate" (versions scored on a dataset, nothing stored)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.EXPAND, server_default="expand")
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    base_version: Mapped[int] = mapped_column(Integer)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    new_labels: Mapped[list[str]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_version: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # What the user should know about the job: said at submission, added to when it ends.
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    # Webhook on the final status, delivered by the API's notifier (an outbox in this row).
    notify_url: Mapped[str | None] = mapped_column(String(2000))
    notify_state: Mapped[str | None] = mapped_column(String(16), index=True)
    notify_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    notify_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    model: Mapped[Model] = relationship(lazy="joined")  # a job's answer names its model
    dataset: Mapped[Dataset] = relationship()


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(26), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
