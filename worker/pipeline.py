"""One job, from claim to stored version:

1. claim the row (queued -> running, attempt + 1, lease), or leave if someone else has it;
2. run the engine while a heartbeat extends the lease, writes progress and watches for cancel;
3. write the artifacts, then in one transaction fenced on the attempt number mark the job
   succeeded and add the version (retried while the database is away). A worker that lost
   its lease writes nothing. The lifecycle's pieces are in ``worker.lifecycle``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from core import job_state
from core.db import session_scope
from core.disk import below_floor
from core.janitor import clean_decoded, clean_tmp
from core.logs import current_job
from core.models import Job, JobKind, JobStatus, Model, ModelVersion, VersionStatus, new_id
from core.settings import Settings
from core.storage import Storage, StoredObject, open_storage
from core.versions import (
    add_version,
    artifact_metadata,
    next_version_number,
    store_model_files,
)
from engine.artifacts import PROBE_IMAGES
from engine.data import sample_images
from engine.errors import DiskFull, EngineError, JobCancelled, resource_error
from engine.expand import (
    ExpansionResult,
    Progress,
    expand_classifier,
)
from engine.gate import decide
from engine.preprocessing import Preprocessing
from engine.refit import slow_on_cpu
from worker.evaluation import run_evaluation
from worker.lifecycle import (
    Heartbeat,
    LeaseLost,
    StopReason,
    claim_job,
    database_unreachable,
    fenced_finish,
    finish,
    job_error,
    job_folder,
    not_recorded,
    release,
    stopped,
    with_retries,
)
from worker.references import cache_features, keep_reference
from worker.spec import JobSpec, expansion_request, load_spec

log = logging.getLogger(__name__)


def run_job(job_id: str, settings: Settings) -> None:
    token = current_job.set(job_id)
    try:
        _run_job(job_id, settings)
    finally:
        current_job.reset(token)
        try:  # what killed attempts of any job left on this worker's disk, and the decoded
            # pixels of deleted datasets (a worker with a disk of its own: the API's is not it)
            clean_tmp(settings)
            clean_decoded(settings)
        except Exception:
            log.warning("could not clean the temporary folder", exc_info=True)


def _run_job(job_id: str, settings: Settings) -> None:
    attempt = claim_job(settings, job_id)
    if attempt is None:
        log.info("job %s is not claimable (taken, finished or cancelled)", job_id)
        return
    log.info("job %s: attempt %d started", job_id, attempt)
    settings.ensure_dirs()
    if message := below_floor(settings):
        finish(settings, job_id, attempt, JobStatus.FAILED, job_error("disk_full", message))
        return
    for stale in settings.tmp_dir.glob(f"job-{job_id}-*"):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    storage = open_storage(settings)
    stored: list[StoredObject] = []  # what to delete if the attempt does not finish
    hand_back: str | None = None
    kind = with_retries(settings, f"job {job_id}: reading it", lambda: _kind(settings, job_id))
    with Heartbeat(settings, job_id, attempt) as heartbeat:
        try:
            if kind == JobKind.EVALUATE:
                run_evaluation(settings, storage, job_id, attempt, heartbeat)
            else:
                _expand(settings, storage, job_id, attempt, heartbeat, stored)
            log.info("job %s: succeeded", job_id)
        except JobCancelled:
            _discard(storage, stored, job_id)
            if heartbeat.stop_reason == StopReason.SHUTDOWN:
                hand_back = "its worker shut down"
            else:
                stopped(heartbeat)
        except LeaseLost:
            _discard(storage, stored, job_id)
        except EngineError as exc:
            _discard(storage, stored, job_id)
            finish(settings, job_id, attempt, JobStatus.FAILED, job_error(exc.code, exc))
        except Exception as exc:
            _discard(storage, stored, job_id)
            if (resource := resource_error(exc)) is not None:
                log.warning("job %s: %s", job_id, resource)
                error = job_error(resource.code, resource)
                finish(settings, job_id, attempt, JobStatus.FAILED, error)
            elif database_unreachable(exc):  # mid-job: the work is lost, the attempt is not
                log.warning("job %s: the database is unreachable (%s)", job_id, exc)
                hand_back = "the database was unreachable"
            else:
                log.exception("job %s failed", job_id)
                error = job_error("internal_error", f"{type(exc).__name__}: {exc}")
                finish(settings, job_id, attempt, JobStatus.FAILED, error)
    if hand_back:  # after the heartbeat has stopped: nothing of this attempt writes again
        release(settings, job_id, attempt, hand_back)


def _ensure_room(settings: Settings, model: torch.nn.Module, exports: int) -> None:
    """:class:`DiskFull` unless the version's files fit above the floor: each format about
    the size of the weights, written in the job's folder and then stored (twice, on local
    storage); the safetensors file, the exports and a family's own format."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if message := below_floor(settings, 2 * size * (2 + exports), "the version's files"):
        raise DiskFull(message)


def _kind(settings: Settings, job_id: str) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(Job.kind).where(Job.id == job_id)) or JobKind.EXPAND


def _expand(
    settings: Settings,
    storage: Storage,
    job_id: str,
    attempt: int,
    heartbeat: Heartbeat,
    stored: list[StoredObject],
) -> None:
    """A new version: the engine's expansion, its artifacts, then the version's row (once
    the job's temporary folder is gone)."""
    with job_folder(settings, job_id) as tmp:
        spec = load_spec(settings, job_id)
        request = expansion_request(spec, storage, settings, tmp)
        result = expand_classifier(request, heartbeat.report, heartbeat.should_stop)
        heartbeat.report(Progress("exporting", 0.0))
        if heartbeat.should_stop():  # cancelled, or the disk fell, since the engine's last step
            raise JobCancelled()
        _ensure_room(settings, result.model, len(spec.config.export))
        version_id = new_id()
        # new labels first: a file that breaks on them is found before it is stored
        samples = sorted(request.samples, key=lambda s: s.label not in request.new_labels)
        images = sample_images(samples, request.preprocessing, PROBE_IMAGES)
        artifacts, failed = _store_artifacts(storage, spec, version_id, result, tmp, stored, images)
        reference = keep_reference(storage, spec.model_id, version_id, result, tmp)
        if reference:
            stored.append(StoredObject(**reference["manifest"]))
        lineage = _store_lineage(storage, spec, version_id, result, tmp, stored)
        remembered = request.reference.images if request.reference else []
        digests = {r.digest for r in remembered}
        cache_features(storage, spec.model_id, digests, result, tmp)
    _finish_succeeded(
        settings, job_id, attempt, spec, version_id, result, artifacts, reference, failed, lineage
    )


def _store_lineage(
    storage: Storage,
    spec: JobSpec,
    version_id: str,
    result: ExpansionResult,
    tmp: Path,
    stored: list[StoredObject],
) -> dict[str, Any]:
    """Keep what the new version's layer was fitted on (see ``engine.lineage``); the
    value of the version's ``lineage``."""
    path = tmp / "lineage.safetensors"
    result.lineage.save(path)
    obj = storage.put_file(f"models/{spec.model_id}/{version_id}/lineage.safetensors", path)
    stored.append(obj)
    return asdict(obj) | {"folds": result.lineage.folds, "images": result.lineage.seen}


def _store_artifacts(
    storage: Storage,
    spec: JobSpec,
    version_id: str,
    result: ExpansionResult,
    tmp: Path,
    stored: list[StoredObject],
    images: torch.Tensor,
) -> tuple[dict[str, StoredObject], dict[str, str]]:
    """Write every format before the version exists; a reader never sees half a version.
    Each file is run in its own runtime on ``images`` (a few of the job's) first.
    Each object is added to ``stored`` as soon as it exists. A format the architecture cannot
    be exported to is left out (and reported), not a reason to lose the job's work."""
    metadata = artifact_metadata(
        spec.model_name,
        spec.architecture,
        result.labels,
        spec.preprocessing,
        spec.base_version,
    )
    return store_model_files(
        storage,
        f"models/{spec.model_id}/{version_id}",
        result.model,
        metadata,
        Preprocessing.from_dict(spec.preprocessing),
        spec.config.export,
        tmp,
        stored,
        images,
    )


def _finish_succeeded(
    settings: Settings,
    job_id: str,
    attempt: int,
    spec: JobSpec,
    version_id: str,
    result: ExpansionResult,
    artifacts: dict[str, StoredObject],
    reference: dict[str, Any] | None,
    failed_exports: dict[str, str] | None = None,
    lineage: dict[str, Any] | None = None,
) -> None:
    metrics = dict(result.metrics)
    metrics["gate"] = decide(metrics, result.labels, len(spec.labels), spec.config.gate)
    with_retries(
        settings,
        f"job {job_id}: recording the new version",
        lambda: _write_success(
            settings,
            job_id,
            attempt,
            spec,
            version_id,
            result,
            artifacts,
            reference,
            metrics,
            failed_exports or {},
            lineage,
        ),
    )


def _write_success(
    settings: Settings,
    job_id: str,
    attempt: int,
    spec: JobSpec,
    version_id: str,
    result: ExpansionResult,
    artifacts: dict[str, StoredObject],
    reference: dict[str, Any] | None,
    metrics: dict[str, Any],
    failed_exports: dict[str, str],
    lineage: dict[str, Any] | None = None,
) -> None:
    gate = metrics["gate"]
    with session_scope(settings.resolved_database_url) as session:
        warnings = list(session.scalar(select(Job.warnings).where(Job.id == job_id)) or [])
        warnings += [
            f"the new version has no {fmt} file: its architecture could not be exported to "
            f"{fmt} ({reason}); its formats are {', '.join(artifacts)}"
            for fmt, reason in failed_exports.items()
        ]
        number = next_version_number(session, spec.model_id)
        warnings += outcome_warnings(gate, spec, number, metrics)
        fenced = fenced_finish(
            session, job_id, attempt, JobStatus.SUCCEEDED, metrics=metrics, warnings=warnings
        )
        if not fenced:
            if session.get(ModelVersion, version_id) is not None:
                return  # an earlier try committed, and only its answer was lost
            raise not_recorded(session, job_id, attempt)
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
            artifacts={fmt: asdict(o) for fmt, o in artifacts.items()},
            reference=reference,
            lineage=lineage,
        )
        job_state.note_version(session, job_id, version.version)


def outcome_warnings(
    gate: dict[str, Any], spec: JobSpec, number: int, metrics: dict[str, Any]
) -> list[str]:
    """What the user must know about the stored version: why it is not the latest, what
    would change that, and images that look mislabeled or were left out."""
    out = []
    name, base = spec.model_name, spec.base_version
    if gate["decision"] != VersionStatus.PROMOTED:
        steps = "; ".join(gate["next_steps"])
        out.append(
            f"version {number} is {gate['decision']} and was not made the latest: "
            f"{gate['reason'].split(': ', 1)[-1]}. To change that: {steps}"
            + (
                f" (a reference set: POST /v1/models/{name}/versions/{base}/reference)"
                if gate["decision"] in (VersionStatus.HELD, VersionStatus.UNVERIFIED)
                else ""
            )
            + f"; or promote it on purpose (POST /v1/models/{name}/versions/{number}/promote)"
        )
    issues = metrics.get("label_issues") or {}
    if issues.get("count"):
        shown = ", ".join(
            f"{i['file'] or i['digest'][:12]} ({i['label']}, looks like {i['looks_like']})"
            for i in issues["images"][:3]
        )
        out.append(
            f"{issues['count']} of {issues['checked']} images look mislabeled (the layers that "
            f"never saw them confidently put them in another label), e.g. {shown}: see "
            "metrics.label_issues"
        )
    slow = slow_on_cpu(metrics["refit"]) if "refit" in metrics else None
    if slow:
        out.append(slow)
    conflicts = (metrics.get("hygiene") or {}).get("conflicts") or []
    if conflicts:
        shown = ", ".join(
            f"{c['digest'][:12]} ({' and '.join(c['labels'])})" for c in conflicts[:3]
        )
        out.append(
            f"{len(conflicts)} images were left out: the same image under two labels, e.g. {shown}"
        )
    return out


def _discard(storage: Storage, stored: list[StoredObject], job_id: str) -> None:
    for obj in stored:
        storage.delete(obj.key)
    if stored:
        log.info("job %s: discarded %d artifacts of a lost attempt", job_id, len(stored))
