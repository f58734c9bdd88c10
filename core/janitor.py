"""Removing what nothing owns: the temporary folders of killed uploads and attempts, and the
stored objects a killed request or worker wrote before its row.

Run by the sweeper every ``orphan_grace_s / 4`` (at least a minute apart). A temporary folder
that a live process holds (:mod:`core.scratch`) is never removed; one nobody holds goes once it
was last written ``orphan_grace_s`` ago, a job's as soon as its job is not running.

Owners: a dataset's images (``datasets/<id>/``) belong to its row until it is deleted; a
version's files (``models/<m>/<v>/``) to the version's row; a model's reference images
(``models/<m>/reference/<sha256>``) to the manifests of its versions; its feature caches
(``models/<m>/features/``) to the model; a dataset's decoded pixels (``decoded/<id>/``,
see ``engine.decoded``) to its row until it is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import session_scope, utcnow
from core.models import Dataset, Job, JobStatus, Model, ModelVersion
from core.reference_store import image_key, read_manifest
from core.scratch import in_use
from core.settings import Settings
from core.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class Cleaned:
    folders: int = 0
    objects: int = 0


def clean(settings: Settings, storage: Storage | None = None) -> Cleaned:
    """One pass over the temporary folder and the store; returns what was removed."""
    storage = storage or open_storage(settings)
    cutoff = utcnow() - timedelta(seconds=settings.orphan_grace_s)
    cleaned = Cleaned(folders=clean_tmp(settings, cutoff) + clean_decoded(settings, cutoff))
    cleaned.objects = _clean_store(settings, storage, cutoff)
    if cleaned.folders or cleaned.objects:
        log.info(
            "removed %d temporary folders and %d stored objects nothing owned",
            cleaned.folders,
            cleaned.objects,
        )
    return cleaned


def _last_written(path: Path) -> datetime:
    """The newest modification of ``path`` or anything directly in it."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        for child in path.iterdir():
            try:
                times.append(child.stat().st_mtime)
            except FileNotFoundError:
                continue
    return datetime.fromtimestamp(max(times), UTC)


def clean_tmp(settings: Settings, cutoff: datetime | None = None) -> int:
    """What no live process holds (:mod:`core.scratch`): folders of attempts whose job is not
    running, and anything else written before ``cutoff`` (default: ``orphan_grace_s`` ago)."""
    cutoff = cutoff or utcnow() - timedelta(seconds=settings.orphan_grace_s)
    if not settings.tmp_dir.is_dir():
        return 0
    entries = list(settings.tmp_dir.iterdir())
    job_ids = {e.name.split("-")[1] for e in entries if e.name.startswith("job-")}
    with session_scope(settings.resolved_database_url) as session:
        running = set(
            session.scalars(
                select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING)
            )
        )
    removed = 0
    for entry in entries:
        try:
            if in_use(entry):  # a live process is writing it, however deep
                continue
            if entry.name.startswith("job-"):
                stale = entry.name.split("-")[1] not in running
            else:
                stale = _last_written(entry) < cutoff
            if not stale:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        except FileNotFoundError:  # gone meanwhile
            continue
    return removed


def remove_decoded(settings: Settings, dataset_id: str) -> None:
    """Delete a dataset's decoded pixels (once its deletion is committed)."""
    folder = settings.decoded_dir / dataset_id
    if folder.parent == settings.decoded_dir and dataset_id not in ("", ".", ".."):
        shutil.rmtree(folder, ignore_errors=True)


def clean_decoded(settings: Settings, cutoff: datetime | None = None) -> int:
    """Remove the decoded pixels of datasets that are deleted (or were never recorded), and the
    unfinished entries of passes that were killed (written before ``cutoff``, by default
    ``orphan_grace_s`` ago)."""
    if not settings.decoded_dir.is_dir():
        return 0
    cutoff = cutoff or utcnow() - timedelta(seconds=settings.orphan_grace_s)
    for partial in settings.decoded_dir.glob("*/*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if _last_written(partial) < cutoff:
                partial.unlink()
    folders = [p.name for p in settings.decoded_dir.iterdir() if p.is_dir()]
    if not folders:
        return 0
    with session_scope(settings.resolved_database_url) as session:
        live = set(
            session.scalars(
                select(Dataset.id).where(Dataset.id.in_(folders), Dataset.deleted_at.is_(None))
            )
        )
    gone = [name for name in folders if name not in live]
    for name in gone:
        remove_decoded(settings, name)
    return len(gone)


def _clean_store(settings: Settings, storage: Storage, cutoff: datetime) -> int:
    candidates = [
        key
        for prefix in ("datasets", "models")
        for key, written in storage.list_objects(prefix)
        if written < cutoff
    ]
    if not candidates:
        return 0
    with session_scope(settings.resolved_database_url) as session:
        owned = _owned(session, storage, candidates)
    removed = 0
    for key in candidates:
        if key not in owned:
            storage.delete(key)
            removed += 1
    return removed


def _owned(session: Session, storage: Storage, candidates: list[str]) -> set[str]:
    """Which of ``candidates`` a row (or a manifest a row points at) owns."""
    owned = set(session.scalars(select(Dataset.storage_key).where(Dataset.deleted_at.is_(None))))
    models = set(session.scalars(select(Model.id)))
    with_references = {k.split("/")[1] for k in candidates if k.split("/")[2:3] == ["reference"]}
    for model_id, artifacts, reference, lineage in session.execute(
        select(
            ModelVersion.model_id,
            ModelVersion.artifacts,
            ModelVersion.reference,
            ModelVersion.lineage,
        )
    ):
        owned.update(a["key"] for a in (artifacts or {}).values())
        if lineage:
            owned.add(lineage["key"])
        if reference and reference.get("manifest"):
            owned.add(reference["manifest"]["key"])
            if model_id in with_references:
                owned.update(
                    image_key(model_id, digest) for digest, _ in read_manifest(storage, reference)
                )
    owned.update(
        k for k in candidates if k.split("/")[2:3] == ["features"] and k.split("/")[1] in models
    )
    return owned
