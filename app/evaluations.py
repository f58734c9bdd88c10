"""Evaluations: versions of one model scored on one dataset, a job of kind ``evaluate``.

The same workers run them, with the jobs' claim, lease, heartbeat, progress, cancel and
idempotency; the figures are the job's metrics and nothing else is stored. Validation here
answers what a user can fix at once (a version that does not exist, a dataset none of the
versions can be asked about); the rest is said in ``warnings``.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.datasets import get_dataset
from app.jobs import add_job, earlier_job
from app.outbound import refused_destination
from app.registry import find_model, no_model
from app.schemas import EvaluationCreate, EvaluationRead
from core.errors import Invalid, NotFound
from core.job_config import EvaluationConfig
from core.job_state import progress_record
from core.models import Job, JobKind, JobStatus, ModelVersion
from core.settings import Settings

FEW_IMAGES = 30  # a version scored on fewer images than this gets a warning


def create_evaluation(
    session: Session,
    settings: Settings,
    owner: str,
    body: EvaluationCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate the request and add a queued evaluation; ``(job, created)``."""
    request_hash = hashlib.sha256(b"evaluate:" + body.model_dump_json().encode()).hexdigest()
    if idempotency_key and (earlier := earlier_job(session, owner, idempotency_key, request_hash)):
        return earlier, False
    model = find_model(session, owner, body.model)
    if model is None:
        raise Invalid(no_model(session, owner, body.model), "model")
    if len(set(body.versions)) != len(body.versions):
        raise Invalid("versions must be distinct", "versions")
    rows = {
        v.version: v
        for v in session.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version.in_(body.versions)
            )
        )
    }
    for number in body.versions:
        row = rows.get(number)
        if row is None or row.deleted_at is not None:
            why = "was deleted" if row is not None else "does not exist"
            raise Invalid(f"version {number} of {model.name!r} {why}", "versions")
    try:
        dataset = get_dataset(session, owner, body.dataset_id)
    except NotFound:
        raise Invalid(f"no dataset {body.dataset_id!r}", "dataset_id") from None
    if body.notify_url and (refused := refused_destination(str(body.notify_url), settings)):
        raise Invalid(f"notify_url refused: {refused}", "notify_url")
    warnings = _warnings(model.name, [rows[n] for n in body.versions], dataset.labels)
    job = Job(
        owner=owner,
        kind=JobKind.EVALUATE,
        model_id=model.id,
        base_version=body.versions[0],
        dataset_id=dataset.id,
        new_labels=[],
        config=EvaluationConfig(versions=list(body.versions)).model_dump(),
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


def _warnings(name: str, versions: list[ModelVersion], images: dict[str, int]) -> list[str]:
    """Refuses a dataset no version can be asked about; says which images go unscored and
    which figures rest on few images."""
    said = []
    for v in versions:
        known = sum(n for label, n in images.items() if label in set(v.labels))
        if not known:
            raise Invalid(
                f"none of the dataset's labels ({', '.join(sorted(images)[:8])}) is a label of "
                f"{name} version {v.version}: it has no image to be scored on",
                "dataset_id",
            )
        if known < FEW_IMAGES:
            said.append(
                f"version {v.version} is scored on {known} images only: its figures are "
                "rough (see their 95 % intervals)"
            )
    every = set().union(*(v.labels for v in versions))
    ignored = sorted(label for label in images if label not in every)
    if ignored:
        count = sum(images[label] for label in ignored)
        said.append(
            f"{count} images of labels no version knows are not scored: {', '.join(ignored[:8])}"
        )
    return said


def get_evaluation(session: Session, owner: str, evaluation_id: str) -> Job:
    job = session.get(Job, evaluation_id)
    if job is None or job.owner != owner or job.kind != JobKind.EVALUATE:
        raise NotFound(f"no evaluation {evaluation_id!r}")
    return job


def evaluation_read(job: Job) -> EvaluationRead:
    return EvaluationRead(
        id=job.id,
        status=job.status,
        model=job.model.name,
        versions=EvaluationConfig.model_validate(job.config).versions,
        dataset_id=job.dataset_id,
        progress=job.progress,
        result=job.metrics if job.status == JobStatus.SUCCEEDED else None,
        error=job.error,
        warnings=job.warnings or [],
        attempt=job.attempt,
        notify_url=job.notify_url,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
