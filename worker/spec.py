"""What a job asks of the engine: read once from the database, turned into the engine's
typed request (the job's resolved config, the base version and its reference set)."""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from core.job_config import ResolvedJobConfig, read_job_config
from core.models import Job, ModelVersion
from core.settings import Settings
from core.storage import Storage
from engine.calibrate import Calibration
from engine.data import Augmentation, scan_image_folder
from engine.decoded import DecodedCache
from engine.errors import EngineError
from engine.expand import ExpansionConfig, ExpansionRequest
from engine.formats import SAFETENSORS
from engine.lineage import Lineage
from engine.preprocessing import Preprocessing
from engine.train import HeadTraining
from worker.references import base_reference


@dataclass(frozen=True)
class JobSpec:
    """Everything a run needs, read once from the database."""

    model_id: str
    model_name: str
    base_version: int
    architecture: str
    labels: list[str]
    preprocessing: dict[str, Any]
    weights_key: str
    dataset_key: str | None
    dataset_id: str
    new_labels: list[str]
    config: ResolvedJobConfig
    reference: dict[str, Any] | None  # the base version's reference set
    lineage: dict[str, Any] | None = None  # what the base version's layer was fitted on


def load_spec(settings: Settings, job_id: str) -> JobSpec:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        base = session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == job.model_id, ModelVersion.version == job.base_version
            )
        )
        return JobSpec(
            model_id=job.model_id,
            model_name=job.model.name,
            base_version=base.version,
            architecture=base.architecture,
            labels=list(base.labels),
            preprocessing=dict(base.preprocessing),
            weights_key=base.artifacts[SAFETENSORS]["key"],
            dataset_key=job.dataset.storage_key if job.dataset.deleted_at is None else None,
            dataset_id=job.dataset_id,
            new_labels=list(job.new_labels),
            config=read_job_config(job.config, settings.min_retention_images),
            reference=base.reference,
            lineage=base.lineage,
        )


def expansion_config(
    config: ResolvedJobConfig,
    settings: Settings,
    spill_dir: Path | None = None,
    dataset_id: str | None = None,
) -> ExpansionConfig:
    """The engine's view of a job's config and of the worker's settings (the one place the
    engine's dataclasses are built for a job)."""
    aug = config.augmentation
    return ExpansionConfig(
        init=config.init,
        training=HeadTraining(
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            weight_decay=config.weight_decay,
            seed=config.seed,
            old_rows_frozen=config.old_rows != "trainable",
        ),
        validation_split=config.validation_split,
        augmentation=Augmentation(
            views=aug.views,
            hflip=aug.hflip,
            rotation_degrees=aug.rotation_degrees,
            scale=tuple(aug.scale),
            noise_std=aug.noise_std,
            color_jitter=aug.color_jitter,
        ),
        batch_size=settings.extract_batch_size,
        num_workers=settings.extract_workers,
        device=settings.device,
        precision=settings.precision,
        decode=settings.decode,
        freeze=config.freeze,
        calibration=Calibration(
            method=config.calibration, max_old_drop=config.max_old_accuracy_drop
        ),
        feature_memory_bytes=settings.feature_memory_mb << 20,
        spill_dir=spill_dir,  # the job's own folder: a killed attempt's files go with it
        decoded=decoded_cache(settings, dataset_id),
        folds=config.folds,
        solver=config.solver,
        reference_per_label=settings.reference_per_label,
        reference_selection=settings.reference_selection,
    )


def decoded_cache(settings: Settings, dataset_id: str | None) -> DecodedCache | None:
    """Where a dataset's decoded images are kept between jobs and evaluations (a folder per
    dataset, deleted with it), within ``decoded_cache_mb`` in all."""
    if dataset_id is None or settings.decoded_cache_mb <= 0:
        return None
    return DecodedCache(
        settings.decoded_dir,
        dataset_id,
        settings.decoded_cache_mb << 20,
        reserve_bytes=settings.min_free_disk_mb << 20,  # GRAFT_MIN_FREE_DISK_MB's floor
    )


def expansion_request(
    spec: JobSpec, storage: Storage, settings: Settings, tmp: Path
) -> ExpansionRequest:
    if spec.dataset_key is None or not storage.exists(spec.dataset_key):
        raise EngineError("the job's dataset has been deleted")
    images = tmp / "images"
    with tarfile.open(storage.local_path(spec.dataset_key)) as tar:
        unpack_dataset_tar(tar, images)
    keep = set(spec.labels) | set(spec.new_labels)
    samples = [s for s in scan_image_folder(images) if s.label in keep]
    return ExpansionRequest(
        architecture=spec.architecture,
        labels=spec.labels,
        weights=storage.local_path(spec.weights_key),
        preprocessing=Preprocessing.from_dict(spec.preprocessing),
        samples=samples,
        new_labels=spec.new_labels,
        config=expansion_config(
            spec.config, settings, spill_dir=tmp / "features", dataset_id=spec.dataset_id
        ),
        reference=base_reference(storage, spec.model_id, spec.reference, tmp / "reference"),
        lineage=base_lineage(storage, spec.lineage),
    )


def base_lineage(storage: Storage, lineage: dict[str, Any] | None) -> Lineage | None:
    """The base version's lineage; None when it has none (registered, or made before lineages
    were kept: its images then count as never seen, as before)."""
    if not lineage:
        return None
    return Lineage.load(storage.local_path(lineage["key"]))


def unpack_dataset_tar(tar: tarfile.TarFile, target: Path, filters: bool | None = None) -> None:
    """Unpack a stored dataset: regular files only, every one inside ``target``. Python's
    extraction filters do that where they exist (3.11.4 on); before them (Debian bookworm's
    3.11.2, say) the members are checked and copied here. ``filters``: which way (default: the
    filters where available)."""
    if filters is None:
        filters = hasattr(tarfile, "data_filter")
    if filters:
        tar.extractall(target, filter="data")
        return
    for member in tar:
        parts = PurePosixPath(member.name).parts
        if member.isdir():
            continue
        if not member.isfile() or not parts or parts[0] == "/" or ".." in parts:
            raise EngineError(f"the stored dataset holds an unsafe entry: {member.name!r}")
        path = target.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        with source, path.open("wb") as out:
            shutil.copyfileobj(source, out)
