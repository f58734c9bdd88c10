"""An evaluation job: stored versions scored on a dataset; the figures are the job's metrics,
and nothing else is stored. Claim, lease, heartbeat and fenced finish are the pipeline's."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from core.job_config import EvaluationConfig
from core.models import Job, JobStatus, ModelVersion
from core.reference_store import read_manifest
from core.settings import Settings
from core.storage import Storage
from engine.compare import CompareConfig, Stage, VersionFile, compare_versions
from engine.data import Sample, scan_image_folder
from engine.errors import EngineError
from engine.expand import Progress
from engine.formats import SAFETENSORS
from engine.lineage import Lineage
from engine.preprocessing import Preprocessing
from engine.reference import conflicting, file_digest
from worker.lifecycle import Heartbeat, fenced_finish, job_folder, not_recorded, with_retries
from worker.spec import decoded_cache, unpack_dataset_tar


@dataclass(frozen=True)
class StoredVersion:
    version: int
    architecture: str
    labels: list[str]
    preprocessing: dict[str, Any]
    weights_key: str | None  # None: deleted since the evaluation was queued
    lineage: dict[str, Any] | None = None  # what its layer was fitted on
    reference: dict[str, Any] | None = None  # what it remembers


@dataclass(frozen=True)
class EvaluationSpec:
    model_name: str
    versions: list[StoredVersion]
    dataset_id: str
    dataset_key: str | None


def load_evaluation(settings: Settings, job_id: str) -> EvaluationSpec:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        numbers = EvaluationConfig.model_validate(job.config).versions
        rows = {
            v.version: v
            for v in session.scalars(
                select(ModelVersion).where(
                    ModelVersion.model_id == job.model_id, ModelVersion.version.in_(numbers)
                )
            )
        }
        versions = []
        for number in numbers:
            row = rows.get(number)
            gone = row is None or row.deleted_at is not None or SAFETENSORS not in row.artifacts
            versions.append(
                StoredVersion(
                    number,
                    row.architecture if row else "",
                    list(row.labels) if row else [],
                    dict(row.preprocessing) if row else {},
                    None if gone else row.artifacts[SAFETENSORS]["key"],
                    None if gone else row.lineage,
                    None if gone else row.reference,
                )
            )
        dataset = job.dataset
        return EvaluationSpec(
            job.model.name,
            versions,
            dataset.id,
            dataset.storage_key if dataset.deleted_at is None else None,
        )


def run_evaluation(
    settings: Settings, storage: Storage, job_id: str, attempt: int, heartbeat: Heartbeat
) -> None:
    """Score the versions, then record the figures (once the temporary folder is gone)."""
    with job_folder(settings, job_id) as tmp:
        result = _score(settings, storage, job_id, heartbeat, tmp)
    with_retries(
        settings,
        f"job {job_id}: recording the evaluation",
        lambda: _write(settings, job_id, attempt, result),
    )


def _score(
    settings: Settings, storage: Storage, job_id: str, heartbeat: Heartbeat, tmp: Path
) -> dict[str, Any]:
    spec = load_evaluation(settings, job_id)
    if spec.dataset_key is None or not storage.exists(spec.dataset_key):
        raise EngineError("the evaluation's dataset has been deleted")
    for v in spec.versions:
        if v.weights_key is None:
            raise EngineError(f"version {v.version} of {spec.model_name} has been deleted")
    heartbeat.report(Progress("loading", 0.0, message="unpacking the dataset"))
    with tarfile.open(storage.local_path(spec.dataset_key)) as tar:
        unpack_dataset_tar(tar, tmp / "images")
    samples, hygiene, digests = distinct_samples(scan_image_folder(tmp / "images"))
    files = [
        VersionFile(
            v.version,
            v.architecture,
            v.labels,
            storage.local_path(v.weights_key),
            Preprocessing.from_dict(v.preprocessing),
        )
        for v in spec.versions
        if v.weights_key is not None
    ]
    config = CompareConfig(
        device=settings.device,
        precision=settings.precision,
        decode=settings.decode,
        batch_size=settings.extract_batch_size,
        num_workers=settings.extract_workers,
        feature_memory_bytes=settings.feature_memory_mb << 20,
        spill_dir=tmp / "features",
        decoded=decoded_cache(settings, spec.dataset_id),
    )

    def report(stage: Stage) -> None:
        heartbeat.report(Progress(stage.stage, stage.fraction, message=stage.message))

    result = compare_versions(files, samples, config, report, heartbeat.should_stop, digests)
    overlap = {str(v.version): _overlap(storage, v, set(digests)) for v in spec.versions}
    return (
        {"model": spec.model_name, "dataset_id": spec.dataset_id}
        | result
        | {
            "hygiene": hygiene,
            "overlap": overlap,
        }
    )


def distinct_samples(samples: list[Sample]) -> tuple[list[Sample], dict[str, Any], list[str]]:
    """Each image once: copies under one label count once (else they narrow the intervals as
    if they were evidence), and an image under two labels is left out (it cannot be right
    under both). Returns the samples, what was removed, and the samples' digests."""
    digest_of = [file_digest(s.path) for s in samples]
    conflicted = conflicting(zip(digest_of, (s.label for s in samples), strict=True))
    kept, seen, copies = [], {}, 0  # seen: digest -> its sample, in order
    for sample, digest in zip(samples, digest_of, strict=True):
        if digest in conflicted:
            continue
        if digest in seen:
            copies += 1
            continue
        seen[digest] = sample
        kept.append(sample)
    hygiene = {
        "copies_removed": copies,
        "conflicts": [{"digest": d, "labels": labels} for d, labels in sorted(conflicted.items())],
    }
    return kept, hygiene, list(seen)


def _overlap(storage: Storage, version: StoredVersion, digests: set[str]) -> dict[str, Any]:
    """How many of the evaluation's images the version was fitted on, and remembers: figures
    on those are optimistic. ``trained_on`` is None when the version does not say (registered
    versions, and those made before lineages were kept)."""
    remembered = {d for d, _ in read_manifest(storage, version.reference)}
    trained = None
    if version.lineage:
        trained = len(
            digests & set(Lineage.load(storage.local_path(version.lineage["key"])).fold_of)
        )
    return {"trained_on": trained, "remembered": len(digests & remembered), "images": len(digests)}


def evaluation_warnings(result: dict[str, Any]) -> list[str]:
    """What makes the evaluation's figures less than they seem: images a version was fitted
    on or remembers, copies, and images under two labels."""
    out = []
    for version, seen in result.get("overlap", {}).items():
        if seen["trained_on"] or seen["remembered"]:
            parts = []
            if seen["trained_on"]:
                parts.append(f"was fitted on {seen['trained_on']}")
            if seen["remembered"]:
                parts.append(f"remembers {seen['remembered']} in its reference set")
            out.append(
                f"version {version} {' and '.join(parts)} of these {seen['images']} images: "
                "its figures on them are optimistic; evaluate on images no job saw"
            )
    hygiene = result.get("hygiene") or {}
    if hygiene.get("copies_removed"):
        out.append(f"{hygiene['copies_removed']} copies of images were counted once")
    if hygiene.get("conflicts"):
        out.append(
            f"{len(hygiene['conflicts'])} images under two labels were left out (an image "
            "cannot be right under both)"
        )
    return out


def _write(settings: Settings, job_id: str, attempt: int, result: dict[str, Any]) -> None:
    with session_scope(settings.resolved_database_url) as session:
        warnings = list(session.scalar(select(Job.warnings).where(Job.id == job_id)) or [])
        warnings += evaluation_warnings(result)
        finished = fenced_finish(
            session, job_id, attempt, JobStatus.SUCCEEDED, metrics=result, warnings=warnings
        )
        if not finished:
            row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one()
            if tuple(row) == (JobStatus.SUCCEEDED, attempt):
                return  # an earlier try committed, and only its answer was lost
            raise not_recorded(session, job_id, attempt)
