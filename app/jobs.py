"""Jobs: submission, reading and cancellation.

Submitting writes the job row; the caller commits and only then rings the broker with the id.
A job that the broker forgot is still queued in the database, and the sweep (app.sweeper)
rings again.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.datasets import get_dataset
from app.gate import resolve
from app.outbound import refused_destination
from app.registry import find_model, no_model
from app.schemas import JobCreate, JobRead
from core import job_state
from core.db import paginate
from core.errors import Conflict, InProgress, Invalid, NotFound
from core.job_config import ResolvedJobConfig
from core.job_state import progress_record
from core.models import Job, JobStatus, Model, ModelVersion
from core.settings import Settings


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


def create_job(
    session: Session,
    settings: Settings,
    owner: str,
    body: JobCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate the request and add a queued job; ``(job, created)``.

    With an ``idempotency_key`` already used for the same body, the earlier job comes back and
    ``created`` is False.
    """
    request_hash = _request_hash(body)
    if idempotency_key and (earlier := earlier_job(session, owner, idempotency_key, request_hash)):
        return earlier, False

    model = find_model(session, owner, body.model)
    if model is None:
        raise Invalid(no_model(session, owner, body.model), "model")
    base = _base_version(session, model, body.base_version)
    try:
        dataset = get_dataset(session, owner, body.dataset_id)
    except NotFound:
        raise Invalid(f"no dataset {body.dataset_id!r}", "dataset_id") from None
    new_labels = _new_labels(
        body, base.labels, dataset.labels, f"{model.name} version {base.version}"
    )
    if body.notify_url and (refused := refused_destination(str(body.notify_url), settings)):
        raise Invalid(f"notify_url refused: {refused}", "notify_url")
    known = set(base.labels)
    old_images = sum(n for label, n in dataset.labels.items() if label in known)
    remembered = sum(base.reference_counts.values())
    config = ResolvedJobConfig.resolve(
        body.config,
        has_old_images=bool(old_images or remembered),
        gate=resolve(settings, model.gate, body.config.gate),
    )
    warnings = submission_warnings(model.name, base, old_images, remembered, config.gate.min_images)

    job = Job(
        owner=owner,
        model_id=model.id,
        base_version=base.version,
        dataset_id=dataset.id,
        new_labels=new_labels,
        config=config.stored(),
        status=JobStatus.QUEUED,
        progress=progress_record("queued", 0.0),
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        notify_url=str(body.notify_url) if body.notify_url else None,
        notify_state="pending" if body.notify_url else None,
        warnings=warnings,
    )
    return add_job(session, job, model)


def add_job(session: Session, job: Job, model: Model) -> tuple[Job, bool]:
    """Add a new job row; ``(job, True)``, or ``(earlier, False)`` when the same
    Idempotency-Key and body has just been committed by a request at the same moment."""
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # the same key, submitted at the same moment, has just committed
        session.rollback()
        key, request_hash = job.idempotency_key or "", job.request_hash or ""
        if earlier := earlier_job(session, job.owner, key, request_hash):
            return earlier, False
        raise InProgress("a request with this Idempotency-Key is being processed; retry") from None
    job.model = model
    return job, True


def earlier_job(session: Session, owner: str, key: str, request_hash: str) -> Job | None:
    """The job an Idempotency-Key already made, if any (422 if it was for another body)."""
    earlier = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    if earlier is not None and earlier.request_hash != request_hash:
        raise Invalid(
            "this Idempotency-Key was used with a different request body", "Idempotency-Key"
        )
    return earlier


def submission_warnings(
    name: str, base: ModelVersion, old_images: int, remembered: int, minimum: int
) -> list[str]:
    """Say up front when the new version's retention will not be measurable (``minimum``:
    the old-label images the gate needs)."""
    if old_images + remembered >= minimum:
        return []
    fix = (
        "upload images of some of the model's labels in the dataset, or add a reference set "
        f"to version {base.version} (POST /v1/models/{name}/versions/{base.version}/reference)"
    )
    have = (
        "the dataset has no images of the model's labels and "
        f"version {base.version} has no reference set"
        if not old_images + remembered
        else f"only {old_images + remembered} old-label images are available "
        f"({old_images} in the dataset, {remembered} in the reference set), "
        f"fewer than the {minimum} needed"
    )
    return [
        f"retention cannot be measured: {have}. The new version will be stored as unverified "
        f"and not made the latest; to measure it, {fix}"
    ]


def _base_version(session: Session, model: Model, version: int | None) -> ModelVersion:
    number = version or model.latest_version
    row = (
        session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version == number
            )
        )
        if number
        else None
    )
    if number is None:
        raise Invalid(
            f"model {model.name!r} has no promoted version to build on; name one with base_version",
            "base_version",
        )
    if row is None:
        raise Invalid(f"model {model.name!r} has no version {number}", "base_version")
    if row.deleted_at is not None:
        raise Invalid(
            f"version {number} of {model.name!r} was deleted; build on another version",
            "base_version",
        )
    return row


def _new_labels(
    body: JobCreate, base_labels: list[str], dataset_labels: dict[str, int], base: str
) -> list[str]:
    if body.new_labels is None:
        labels = [label for label in dataset_labels if label not in base_labels]
        if not labels:
            which = "" if body.base_version else ", its latest promoted version"
            raise Invalid(
                f"every label of the dataset is already a label of {base}{which}; add a folder "
                "of images for each new label (new_labels names them), or give base_version to "
                "grow an earlier version that lacks them",
                "new_labels",
            )
    else:
        labels = body.new_labels
        if len(set(labels)) != len(labels):
            raise Invalid("new_labels must be distinct", "new_labels")
    known = sorted(set(labels) & set(base_labels))
    if known:
        raise Invalid(f"already labels of the base model: {known[:5]}", "new_labels")
    splits = [label for label in labels if label.strip().lower() in SPLIT_NAMES]
    if splits and body.new_labels is None:
        raise Invalid(
            f"the dataset's folders {', '.join(repr(x) for x in splits)} look like a "
            "train/validation split, not labels: Graft takes one folder per label at the top "
            "of the archive (<label>/<image>), all images of a label together, and holds out "
            "what it measures on by itself. Pack the archive as <label>/<image>, merging the "
            "splits; or, if they really are labels, name them in new_labels",
            "dataset_id",
        )
    minimum = body.config.min_images_per_label
    for label in labels:
        count = dataset_labels.get(label, 0)
        if count < minimum:
            raise Invalid(
                f"new label {label!r} has {count} images in the dataset; at least {minimum} needed",
                "new_labels",
            )
    return labels


# Folder names that say "a split of the data", not "a kind of image".
SPLIT_NAMES = {
    "train",
    "training",
    "trainval",
    "val",
    "valid",
    "validation",
    "dev",
    "test",
    "testing",
    "eval",
    "evaluation",
    "holdout",
    "calibration",
}


def get_job(session: Session, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound(f"no job {job_id!r}")
    return job


def list_jobs(
    session: Session,
    owner: str,
    *,
    status: str | None,
    model: str | None,
    limit: int,
    cursor: str | None,
    kind: str | None = None,
) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.owner == owner)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    if model:
        query = query.join(Model, Model.id == Job.model_id).where(Model.name == model)
    return paginate(session, query, Job.id, limit, cursor, descending=True)


def cancel_job(session: Session, owner: str, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (its worker checks
    between steps and within seconds)."""
    job = get_job(session, owner, job_id)
    if not job_state.cancel(session, job.id):
        session.refresh(job)
        raise Conflict(too_late(job))
    session.refresh(job)
    return job


def too_late(job: Job) -> str:
    """Why a cancel came too late: the job had finished, and what it left."""
    if job.status == JobStatus.SUCCEEDED and job.result_version is not None:
        return (
            f"too late: job {job.id} has already finished; it succeeded and recorded version "
            f"{job.result_version} of {job.model.name} (DELETE the version to undo it)"
        )
    return f"too late: job {job.id} has already finished ({job.status})"


def job_read(job: Job) -> JobRead:
    return JobRead(
        id=job.id,
        kind=job.kind,
        status=job.status,
        model=job.model.name,
        base_version=job.base_version,
        dataset_id=job.dataset_id,
        new_labels=job.new_labels,
        config=job.config,
        progress=job.progress,
        metrics=job.metrics,
        result=(
            {
                "model": job.model.name,
                "version": job.result_version,
                "gate": ((job.metrics or {}).get("gate") or {}).get("decision"),
            }
            if job.result_version is not None
            else None
        ),
        error=job.error,
        warnings=job.warnings or [],
        attempt=job.attempt,
        notify_url=job.notify_url,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
