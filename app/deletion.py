"""Deleting models and versions.

The rows change first, in one transaction; the stored files go once it is committed (never
before: a deletion the database refuses leaves everything whole). Files the store cannot
delete then are owned by no row any more, and the sweep (``core.janitor``) removes them.

A deleted version keeps its row as a tombstone (``deleted_at`` set, no files, no reference
set) so that the lineage of versions made from it stays readable, and its number is never
given to another version. A deleted model takes its versions, promotions and jobs with it,
and frees its name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app import registry
from core.db import utcnow
from core.errors import Conflict, ServiceError
from core.job_config import EvaluationConfig
from core.models import Job, JobKind, JobStatus, Model, ModelVersion, Promotion, VersionStatus
from core.storage import Storage

log = logging.getLogger(__name__)
DELETED = "deleted"  # the status a deleted version shows
ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class Gone(ServiceError):
    """The version existed and was deleted: its files are gone for good."""

    status = 410
    title = "Gone"
    type_ = "https://graft.dev/problems/gone"


@dataclass
class Removal:
    """What a committed deletion leaves to remove from the store: known keys, and folders
    whose every object goes (leftovers of interrupted writes included)."""

    keys: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)  # jobs whose records went


def is_deleted(version: ModelVersion) -> bool:
    return version.deleted_at is not None


def live_version(session: Session, owner: str, name: str, number: int) -> ModelVersion:
    """The version, or 404 (no such model or version) or 410 (it was deleted)."""
    row = registry.get_version(session, owner, name, number)
    if is_deleted(row):
        raise Gone(
            f"version {number} of {name!r} was deleted on {row.deleted_at:%Y-%m-%d %H:%M} UTC; "
            "its files are gone (GET the version for what it was)"
        )
    return row


def _lock(session: Session, model: Model) -> None:
    """Serialise with promotions and new versions of the model (on databases that can)."""
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    session.refresh(model)


def _active_jobs(session: Session, model: Model) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.model_id == model.id, Job.status.in_(ACTIVE)).order_by(Job.id)
        )
    )


def _uses(job: Job, number: int) -> bool:
    """Whether the job reads the version: its base, or one of the versions it scores."""
    if job.base_version == number:
        return True
    return (
        job.kind == JobKind.EVALUATE
        and number in EvaluationConfig.model_validate(job.config).versions
    )


def _described(jobs: Iterable[Job]) -> str:
    shown = [f"{j.id} ({j.status})" for j in jobs]
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def _version_keys(version: ModelVersion) -> list[str]:
    keys = [a["key"] for a in (version.artifacts or {}).values()]
    manifest = (version.reference or {}).get("manifest")
    if manifest:
        keys.append(manifest["key"])
    if version.lineage:
        keys.append(version.lineage["key"])
    return keys


def delete_version(session: Session, owner: str, name: str, number: int, force: bool) -> Removal:
    """Make the version a tombstone and move ``latest_version`` off it; returns what to
    remove from the store once committed.

    409 while a queued or running job reads the version (whatever ``force``: cancel the job
    first); 409 without ``force`` if it is the model's last promoted version while the model
    has other versions or unfinished jobs (new jobs would have no default base)."""
    model = registry.get_model(session, owner, name)
    _lock(session, model)
    row = live_version(session, owner, name, number)
    active = _active_jobs(session, model)
    readers = [j for j in active if _uses(j, number)]
    if readers:
        raise Conflict(
            f"version {number} of {name!r} is used by job {_described(readers)}, not finished "
            f"yet; cancel it first (POST /v1/jobs/{readers[0].id}/cancel) or wait for it to "
            "end, then delete the version"
        )
    live = [v for v in model.versions if not is_deleted(v) and v.id != row.id]
    promoted = [v.version for v in live if v.status == VersionStatus.PROMOTED]
    if row.status == VersionStatus.PROMOTED and not promoted and (live or active) and not force:
        why = (
            f"the model has other versions ({', '.join(str(v.version) for v in live)})"
            if live
            else f"the model has unfinished jobs ({_described(active)})"
        )
        raise Conflict(
            f"version {number} is the last promoted version of {name!r} and {why}: without it "
            "the model has no latest version and new jobs need an explicit base_version. "
            "Promote another version first, or delete with ?force=true"
        )
    removal = Removal(keys=_version_keys(row), prefixes=[f"models/{model.id}/{row.id}"])
    row.deleted_at = utcnow()
    row.status = DELETED
    row.artifacts = {}
    row.reference = None
    row.lineage = None
    row.reference_revision += 1  # a reference change in flight is refused, not applied
    if model.latest_version == number:
        model.latest_version = max(promoted, default=None)
    session.flush()
    return removal


def delete_model(session: Session, owner: str, name: str, force: bool) -> Removal:
    """Delete the model's rows: the model, its versions, its promotions and its jobs, finished
    or not. 409 without ``force`` while a job on it is queued or running; with ``force``
    those jobs go too (a running job's worker finds its job gone within seconds, stops, and
    keeps nothing). Returns what to remove from the store once committed."""
    model = registry.get_model(session, owner, name)
    _lock(session, model)
    active = _active_jobs(session, model)
    if active and not force:
        raise Conflict(
            f"model {name!r} has jobs that have not finished: {_described(active)}; cancel "
            "them (POST /v1/jobs/{id}/cancel) or wait for them to end, or delete with "
            "?force=true, which stops them"
        )
    removal = Removal(prefixes=[f"models/{model.id}"])
    for version in model.versions:
        removal.keys += _version_keys(version)
    removal.job_ids = list(session.scalars(select(Job.id).where(Job.model_id == model.id)))
    session.execute(delete(Job).where(Job.model_id == model.id))
    session.execute(delete(Promotion).where(Promotion.model_id == model.id))
    session.execute(delete(ModelVersion).where(ModelVersion.model_id == model.id))
    session.execute(delete(Model).where(Model.id == model.id))
    session.expunge(model)
    session.flush()
    return removal


def remove_files(storage: Storage, removal: Removal) -> None:
    """Delete the files of a committed deletion. If the store refuses, the rest stays until
    the sweep removes it (no row owns it any more): one refusal is enough to stop asking."""
    try:
        keys = list(removal.keys)
        for prefix in removal.prefixes:
            keys += [key for key, _ in storage.list_objects(prefix)]
        for key in dict.fromkeys(keys):
            storage.delete(key)
    except Exception:  # noqa: BLE001 (the deletion stands; the sweep finishes it)
        log.warning(
            "could not delete the files of %s now; the sweep will",
            removal.prefixes[0],
            exc_info=True,
        )
