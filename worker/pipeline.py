"""One job, from claim to stored version:

1. claim the row (queued -> running, attempt + 1, lease), or leave if someone else has it;
2. run the engine while a heartbeat extends the lease, writes progress and watches for cancel;
3. write the artifacts, then in one transaction fenced on the attempt number mark the job
   succeeded and add the version. A worker that lost its lease writes nothing.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import session_scope, utcnow
from app.jobs import progress_record
from app.logs import current_job
from app.models import Job, JobStatus, Model, ModelVersion, VersionStatus, new_id
from app.queue import publish_jobs
from app.registry import add_version, artifact_metadata
from app.settings import Settings
from app.storage import Storage, StoredObject, open_storage
from worker.engine.architectures import Preprocessing
from worker.engine.errors import EngineError, JobCancelled
from worker.engine.evidence import retention_gate
from worker.engine.expand import (
    ExpansionResult,
    Progress,
    expand_classifier,
)
from worker.engine.export import export_onnx
from worker.engine.weights import save_safetensors
from worker.references import cache_features, keep_reference
from worker.spec import JobSpec, expansion_request, load_spec

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another attempt owns the job now (our lease expired and the sweep re-queued it)."""


def claim_job(settings: Settings, job_id: str) -> int | None:
    """Take the job if it is queued; return our attempt number, or None."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempt < Job.max_attempts)
            .values(
                status=JobStatus.RUNNING,
                attempt=Job.attempt + 1,
                lease_expires_at=now + timedelta(seconds=settings.job_lease_s),
                started_at=now,
                worker=f"{socket.gethostname()}/{os.getpid()}",
                progress=progress_record("loading", 0.0, "claimed"),
            )
        ).rowcount
        if not claimed:
            return None
        return session.scalar(select(Job.attempt).where(Job.id == job_id))


# Set when the worker process is asked to stop (SIGTERM): the running job is handed back.
shutdown_requested = threading.Event()


class StopReason(enum.StrEnum):
    LOST = "lost"  # another attempt owns the job
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"


class Heartbeat:
    """Keeps the lease alive, flushes progress and reads the cancel flag, once a second; knows
    why the job should stop, if it should."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings, self.job_id, self.attempt = settings, job_id, attempt
        self.cancel_requested = False
        self.lost = False
        self.deadline = time.monotonic() + settings.job_time_limit_s
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, progress: Progress) -> None:
        with self._lock:
            self._pending = asdict(progress)

    @property
    def stop_reason(self) -> StopReason | None:
        if self.lost:
            return StopReason.LOST
        if self.cancel_requested:
            return StopReason.CANCELLED
        if shutdown_requested.is_set():
            return StopReason.SHUTDOWN
        if time.monotonic() > self.deadline:
            return StopReason.TIMEOUT
        return None

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def _run(self) -> None:
        current_job.set(self.job_id)  # threads do not inherit the context
        while not self._stop.wait(1.0):
            try:
                self.beat()
            except Exception:  # a database hiccup: the lease has slack, try again next second
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def beat(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        values: dict[str, Any] = {
            "lease_expires_at": utcnow() + timedelta(seconds=self.settings.job_lease_s)
        }
        if pending is not None:
            values["progress"] = pending
        with session_scope(self.settings.resolved_database_url) as session:
            kept = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.attempt == self.attempt,
                    Job.status == JobStatus.RUNNING,
                )
                .values(**values)
            ).rowcount
            self.lost = self.lost or not kept
            self.cancel_requested = bool(
                session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
            )


def run_job(job_id: str, settings: Settings) -> None:
    token = current_job.set(job_id)
    try:
        _run_job(job_id, settings)
    finally:
        current_job.reset(token)


def _run_job(job_id: str, settings: Settings) -> None:
    attempt = claim_job(settings, job_id)
    if attempt is None:
        log.info("job %s is not claimable (taken, finished or cancelled)", job_id)
        return
    log.info("job %s: attempt %d started", job_id, attempt)
    settings.ensure_dirs()
    for stale in settings.tmp_dir.glob(f"job-{job_id}-*"):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    storage = open_storage(settings)
    stored: list[StoredObject] = []
    with (
        tempfile.TemporaryDirectory(dir=settings.tmp_dir, prefix=f"job-{job_id}-") as tmp,
        Heartbeat(settings, job_id, attempt) as heartbeat,
    ):
        try:
            spec = load_spec(settings, job_id)
            request = expansion_request(spec, storage, settings, Path(tmp))
            result = expand_classifier(request, heartbeat.report, heartbeat.should_stop)
            heartbeat.report(Progress("exporting", 0.0))
            version_id = new_id()
            artifacts = _store_artifacts(storage, spec, version_id, result, Path(tmp))
            stored = list(artifacts)
            reference = keep_reference(storage, spec.model_id, version_id, result, Path(tmp))
            if reference:
                stored.append(StoredObject(**reference["manifest"]))
            remembered = request.reference.images if request.reference else []
            cache_features(
                storage, spec.model_id, {r.digest for r in remembered}, result, Path(tmp)
            )
            _finish_succeeded(
                settings, job_id, attempt, spec, version_id, result, artifacts, reference
            )
            log.info("job %s: succeeded", job_id)
        except JobCancelled:
            _discard(storage, stored, job_id)
            _stopped(settings, job_id, attempt, heartbeat.stop_reason)
        except LeaseLost:
            _discard(storage, stored, job_id)
        except EngineError as exc:
            _discard(storage, stored, job_id)
            _finish(
                settings, job_id, attempt, JobStatus.FAILED, {"code": exc.code, "message": str(exc)}
            )
        except Exception as exc:
            log.exception("job %s failed", job_id)
            _discard(storage, stored, job_id)
            _finish(
                settings,
                job_id,
                attempt,
                JobStatus.FAILED,
                {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
            )


def _store_artifacts(
    storage: Storage, spec: JobSpec, version_id: str, result: ExpansionResult, tmp: Path
) -> list[StoredObject]:
    """Write every format before the version exists; a reader never sees half a version."""
    prefix = f"models/{spec.model_id}/{version_id}"
    metadata = artifact_metadata(
        spec.model_name,
        spec.architecture,
        result.labels,
        spec.preprocessing,
        spec.base_version,
    )
    stored = []
    path = tmp / "model.safetensors"
    save_safetensors(path, result.model, metadata)
    stored.append(storage.put_file(f"{prefix}/model.safetensors", path))
    if "onnx" in spec.config.get("export", []):
        path = tmp / "model.onnx"
        export_onnx(result.model, Preprocessing.from_dict(spec.preprocessing), path)
        stored.append(storage.put_file(f"{prefix}/model.onnx", path))
    return stored


def _finish_succeeded(
    settings: Settings,
    job_id: str,
    attempt: int,
    spec: JobSpec,
    version_id: str,
    result: ExpansionResult,
    artifacts: list[StoredObject],
    reference: dict[str, Any] | None,
) -> None:
    metrics = dict(result.metrics)
    gate = retention_gate(
        metrics["old_classes"],
        spec.config["min_old_accuracy_retention"],
        settings.min_retention_images,
    )
    metrics["gate"] = gate
    with session_scope(settings.resolved_database_url) as session:
        warnings = list(session.scalar(select(Job.warnings).where(Job.id == job_id)) or [])
        if gate["decision"] == VersionStatus.UNVERIFIED:
            number, name = _next_version(session, spec.model_id), spec.model_name
            warnings.append(
                f"version {number} is unverified and was not made the latest: only {gate['n']} "
                f"old-label images could measure its retention, fewer than the "
                f"{gate['min_images']} needed. To measure it, add images of the model's labels "
                f"to the dataset, or a reference set to version {spec.base_version} (POST "
                f"/v1/models/{name}/versions/{spec.base_version}/reference), and run the job "
                f"again; or promote it on purpose "
                f"(POST /v1/models/{name}/versions/{number}/promote)"
            )
        fenced = _fenced_finish(
            session, job_id, attempt, JobStatus.SUCCEEDED, metrics=metrics, warnings=warnings
        )
        if not fenced:
            raise LeaseLost()
        version = add_version(
            session,
            session.get(Model, spec.model_id),
            version_id=version_id,
            parent_version=spec.base_version,
            job_id=job_id,
            architecture=spec.architecture,
            labels=result.labels,
            preprocessing=spec.preprocessing,
            status=VersionStatus(gate["decision"]),
            metrics=metrics,
            artifacts={_format(o.key): asdict(o) for o in artifacts},
            reference=reference,
        )
        session.execute(update(Job).where(Job.id == job_id).values(result_version=version.version))


def _format(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _next_version(session: Session, model_id: str) -> int:
    current = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    )
    return (current or 0) + 1


def _fenced_finish(
    session: Session, job_id: str, attempt: int, status: JobStatus, **values: Any
) -> bool:
    """Set the final status if this attempt still owns the job; False if it does not."""
    return bool(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING)
            .values(
                status=status,
                finished_at=utcnow(),
                lease_expires_at=None,
                progress=progress_record("done", 1.0, str(status)),
                **values,
            )
        ).rowcount
    )


def _finish(
    settings: Settings,
    job_id: str,
    attempt: int,
    status: JobStatus,
    error: dict[str, str] | None,
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        _fenced_finish(session, job_id, attempt, status, error=error)
    log.info("job %s: %s %s", job_id, status, error or "")


def _stopped(settings: Settings, job_id: str, attempt: int, reason: StopReason | None) -> None:
    if reason == StopReason.CANCELLED:
        _finish(settings, job_id, attempt, JobStatus.CANCELLED, None)
    elif reason == StopReason.TIMEOUT:
        limit = settings.job_time_limit_s
        _finish(
            settings,
            job_id,
            attempt,
            JobStatus.FAILED,
            {"code": "timeout", "message": f"the job ran longer than {limit:.0f} s"},
        )
    elif reason == StopReason.SHUTDOWN:
        _release(settings, job_id, attempt)


def _release(settings: Settings, job_id: str, attempt: int) -> None:
    """Hand a job back to the queue when this worker is told to stop. A clean hand-back is not
    a failure, so it does not use up one of the job's attempts."""
    with session_scope(settings.resolved_database_url) as session:
        released = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING)
            .values(
                status=JobStatus.QUEUED,
                queued_at=utcnow(),
                lease_expires_at=None,
                max_attempts=Job.max_attempts + 1,
                progress=progress_record("queued", 0.0, "re-queued: its worker shut down"),
            )
        ).rowcount
    if released:
        publish_jobs(settings, [job_id])
        log.info("job %s: handed back to the queue (worker shutting down)", job_id)


def _discard(storage: Storage, stored: list[StoredObject], job_id: str) -> None:
    for obj in stored:
        storage.delete(obj.key)
    if stored:
        log.info("job %s: discarded %d artifacts of a lost attempt", job_id, len(stored))
