"""Datasets: an upload becomes a tar of verified images, ``<label>/<n>.<ext>``, in the artifact
store (read safely by ``app.archives``), and a row that says what it holds."""

from __future__ import annotations

import enum
import hashlib
import logging
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.archives import ArchiveLimits, extract_images, pack_images
from app.schemas import DatasetRead, RejectedFile
from core.db import paginate, utcnow
from core.errors import Conflict, Invalid, NotFound
from core.models import Dataset, Job, JobStatus, new_id
from core.scratch import scratch
from core.storage import Storage

log = logging.getLogger(__name__)


class DatasetStatus(enum.StrEnum):
    IMPORTING = "importing"  # registered by reference, being copied in (app.imports)
    READY = "ready"
    FAILED = "failed"


def build_dataset(
    storage: Storage,
    owner: str,
    *,
    archive: BinaryIO,
    archive_size: int,
    name: str | None,
    limits: ArchiveLimits,
    tmp_root: Path,
) -> Dataset:
    digest = hashlib.sha256()
    while chunk := archive.read(1024 * 1024):
        digest.update(chunk)
    archive.seek(0)
    dataset_id = new_id()
    with scratch(tmp_root, prefix="dataset-") as workdir:
        (workdir / "images").mkdir()
        extracted = extract_images(archive, archive_size, limits, workdir / "images")
        if not extracted.images:
            raise Invalid(
                "the archive holds no usable image; expected <label>/<image> folders",
                errors=[
                    {"field": "archive", "message": f"{r['path']}: {r['reason']}"}
                    for r in extracted.rejected[:20]
                ]
                or None,
            )
        pack_images(extracted.images, workdir / "images.tar")
        stored = storage.put_file(f"datasets/{dataset_id}/images.tar", workdir / "images.tar")
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        labels=extracted.labels,
        num_images=len(extracted.images),
        rejected=extracted.rejected,
        sha256=digest.hexdigest(),
        storage_key=stored.key,
        size_bytes=stored.size_bytes,
    )
    return row


def add_dataset(session: Session, row: Dataset) -> DatasetRead:
    """Record a dataset whose images ``build_dataset`` has stored."""
    session.add(row)
    session.flush()
    return dataset_read(row)


def find_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    """The owner's dataset, whatever its status (to show or delete it)."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.owner != owner or row.deleted_at is not None:
        raise NotFound(f"no dataset {dataset_id!r}")
    return row


def get_dataset(session: Session, owner: str, dataset_id: str) -> Dataset:
    """The owner's dataset, to use (jobs, reference sets): 409 while it is importing, or if
    its import failed."""
    row = find_dataset(session, owner, dataset_id)
    if row.status == DatasetStatus.IMPORTING:
        done = (row.progress or {}).get("done", 0)
        total = (row.progress or {}).get("total")
        copied = f"{done} of {total}" if total is not None else f"{done}"
        raise Conflict(
            f"dataset {dataset_id!r} is still importing ({copied} files handled); "
            f"use it once GET /v1/datasets/{dataset_id} says status ready"
        )
    if row.status == DatasetStatus.FAILED:
        message = (row.error or {}).get("message", "")
        raise Conflict(f"dataset {dataset_id!r} failed to import ({message}); register it again")
    return row


def list_datasets(
    session: Session, owner: str, limit: int, cursor: str | None
) -> tuple[list[Dataset], str | None]:
    query = select(Dataset).where(Dataset.owner == owner, Dataset.deleted_at.is_(None))
    return paginate(session, query, Dataset.id, limit, cursor, descending=True)


def delete_dataset(session: Session, owner: str, dataset_id: str) -> str:
    """Mark the dataset deleted; returns the key of its images, for ``remove_images`` once
    the deletion is committed (never before: a deletion that fails to commit must leave the
    dataset whole)."""
    row = find_dataset(session, owner, dataset_id)
    active = session.scalar(
        select(Job.id).where(
            Job.dataset_id == row.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
        )
    )
    if active:
        raise Conflict(f"dataset {dataset_id!r} is used by job {active}, which has not finished")
    # Finished jobs keep pointing at the row, so it is marked deleted; the images go.
    row.deleted_at = utcnow()
    session.flush()
    return row.storage_key


def remove_images(storage: Storage, key: str) -> None:
    """Delete the images of a dataset whose deletion is committed. If the store refuses now,
    they stay until the sweep (``core.janitor``) removes them: no row owns them any more."""
    try:
        storage.delete(key)
    except Exception:  # noqa: BLE001 (the deletion stands; the sweep finishes it)
        log.warning("could not delete %s now; the sweep will", key, exc_info=True)


def dataset_read(row: Dataset) -> DatasetRead:
    return DatasetRead(
        id=row.id,
        name=row.name,
        labels=row.labels,
        num_images=row.num_images,
        rejected=[RejectedFile(**r) for r in row.rejected],
        sha256=row.sha256 if row.status == DatasetStatus.READY else None,
        created_at=row.created_at,
        status=row.status,
        source=row.source,
        progress=row.progress,
        error=row.error,
    )
