"""Models and their versions: registration, lookup, and adding a version atomically."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import __version__, references
from app.db import paginate
from app.errors import Conflict, Invalid, NotFound
from app.models import Model, ModelVersion, Promotion, VersionStatus, new_id
from app.schemas import (
    NAME_PATTERN,
    ModelRead,
    ModelVersionRead,
    PreprocessingSpec,
    PromotionRead,
    VersionSummary,
)
from app.storage import Storage
from worker.engine.architectures import Preprocessing, default_preprocessing, parse_architecture
from worker.engine.errors import EngineError, UnknownArchitecture
from worker.engine.weights import (
    convert_to_safetensors,
    is_safetensors,
    load_classifier,
    save_safetensors,
)

SAFETENSORS = "safetensors"


def artifact_metadata(
    name: str, architecture: str, labels: list[str], preprocessing: dict, parent: int | None
) -> dict[str, Any]:
    """What makes a stored safetensors file self-describing."""
    return {
        "format": "pt",
        "architecture": architecture,
        "labels": labels,
        "preprocessing": preprocessing,
        "model": name,
        "parent": "" if parent is None else str(parent),
        "graft_version": __version__,
    }


def parse_labels(raw: str) -> list[str]:
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Invalid(f"labels must be a JSON array of strings: {exc.msg}", "labels") from None
    if not isinstance(labels, list) or not labels:
        raise Invalid("labels must be a non-empty JSON array of strings", "labels")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise Invalid("every label must be a non-empty string", "labels")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise Invalid(f"labels must be distinct; repeated: {duplicates[:5]}", "labels")
    return labels


def parse_preprocessing(raw: str | None, architecture: str) -> Preprocessing:
    if not raw:
        return default_preprocessing(architecture)
    try:
        spec = PreprocessingSpec.model_validate_json(raw)
    except ValidationError as exc:
        errors = [
            {"field": "preprocessing." + ".".join(map(str, e["loc"])), "message": e["msg"]}
            for e in exc.errors()
        ]
        raise Invalid("invalid preprocessing", errors=errors) from None
    return Preprocessing.from_dict(spec.model_dump())


def register_model(
    session: Session,
    storage: Storage,
    owner: str,
    *,
    name: str,
    architecture: str,
    labels_json: str,
    weights: Path,
    preprocessing_json: str | None,
    reference_dataset_id: str | None = None,
    reference_per_label: int = 100,
    tmp_root: Path | None = None,
) -> ModelVersion:
    """Check the weights against the architecture and store them as version 1, with the
    images of ``reference_dataset_id`` (every folder a label of the model) as its reference
    set."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise Invalid(f"name must match {NAME_PATTERN}", "name")
    if find_model(session, owner, name) is not None:
        raise Conflict(f"a model named {name!r} already exists")
    labels = parse_labels(labels_json)
    try:
        parse_architecture(architecture)
    except UnknownArchitecture as exc:
        raise Invalid(str(exc), "architecture") from None
    prep = parse_preprocessing(preprocessing_json, architecture)
    try:
        if not is_safetensors(weights):
            converted = weights.with_suffix(".safetensors")
            convert_to_safetensors(weights, converted)
            weights = converted
        model, _head = load_classifier(architecture, len(labels), weights)
    except EngineError as exc:
        raise Invalid(str(exc), "weights") from None
    dataset = None
    if reference_dataset_id:
        dataset = references.dataset_for_reference(
            session, owner, reference_dataset_id, "reference_dataset_id"
        )
        strangers = sorted(set(dataset.labels) - set(labels))
        if strangers:
            raise Invalid(
                f"the reference dataset has folders that are not labels of the model: "
                f"{strangers[:5]}; a reference set holds images of the model's own labels",
                "reference_dataset_id",
            )

    row = Model(owner=owner, name=name)
    session.add(row)
    session.flush()  # the unique (owner, name) constraint speaks now, before any file is written
    version_id = new_id()
    key = f"models/{row.id}/{version_id}/model.safetensors"
    written: list[str] = []
    try:
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            path = Path(tmp) / "model.safetensors"
            save_safetensors(
                path, model, artifact_metadata(name, architecture, labels, prep.to_dict(), None)
            )
            stored = storage.put_file(key, path)
            written.append(key)
        reference = None
        if dataset is not None:
            reference, _, images = references.extend_reference(
                storage,
                row.id,
                version_id,
                None,
                dataset,
                set(labels),
                reference_per_label,
                tmp_root or Path(tempfile.gettempdir()),
            )
            if reference is not None:
                written += images + [reference["manifest"]["key"]]
    except BaseException:
        for written_key in written:  # the model is new: nothing else points at its files
            storage.delete(written_key)
        raise
    return add_version(
        session,
        row,
        version_id=version_id,
        parent_version=None,
        job_id=None,
        architecture=architecture,
        labels=labels,
        preprocessing=prep.to_dict(),
        status=VersionStatus.PROMOTED,
        metrics=None,
        artifacts={SAFETENSORS: stored.__dict__},
        reference=reference,
    )


def add_version(session: Session, model: Model, **fields: Any) -> ModelVersion:
    """Append the next version of ``model``; promoted versions become ``latest_version``.

    The model row is locked (on databases that can) so concurrent jobs number their versions
    one after another; the unique (model, version) constraint backs this up everywhere.
    """
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    current = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    )
    version_id = fields.pop("version_id", None) or new_id()
    version = ModelVersion(id=version_id, model_id=model.id, version=(current or 0) + 1, **fields)
    session.add(version)
    if version.status == VersionStatus.PROMOTED:
        model.latest_version = version.version
    session.flush()
    return version


def find_model(session: Session, owner: str, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.owner == owner, Model.name == name))


def get_model(session: Session, owner: str, name: str) -> Model:
    model = find_model(session, owner, name)
    if model is None:
        raise NotFound(f"no model named {name!r}")
    return model


def get_version(session: Session, owner: str, name: str, version: int) -> ModelVersion:
    model = get_model(session, owner, name)
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    )
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}")
    return row


def list_models(
    session: Session, owner: str, limit: int, cursor: str | None
) -> tuple[list[Model], str | None]:
    query = select(Model).where(Model.owner == owner)
    return paginate(session, query, Model.name, limit, cursor)


def version_read(model: Model, version: ModelVersion) -> ModelVersionRead:
    main = version.artifacts[SAFETENSORS]
    return ModelVersionRead(
        name=model.name,
        version=version.version,
        parent_version=version.parent_version,
        job_id=version.job_id,
        architecture=version.architecture,
        labels=version.labels,
        num_classes=len(version.labels),
        preprocessing=version.preprocessing,
        status=version.status,
        metrics=version.metrics,
        reference=version.reference_counts,
        formats=list(version.artifacts),
        sha256=main["sha256"],
        size_bytes=main["size_bytes"],
        created_at=version.created_at,
    )


def model_read(model: Model) -> ModelRead:
    return ModelRead(
        name=model.name,
        created_at=model.created_at,
        latest_version=model.latest_version,
        versions=[
            VersionSummary(
                version=v.version,
                parent_version=v.parent_version,
                status=v.status,
                num_classes=len(v.labels),
                reference_images=sum(v.reference_counts.values()),
                created_at=v.created_at,
            )
            for v in model.versions
        ],
        promotions=[
            PromotionRead(
                version=p.version,
                previous_version=p.previous_version,
                previous_status=p.previous_status,
                actor=p.actor,
                reason=p.reason,
                created_at=p.created_at,
            )
            for p in model.promotions
        ],
    )


def promote_version(
    session: Session, owner: str, name: str, version: int, actor: str, reason: str | None
) -> Model:
    """Make ``version`` the model's latest on purpose, whatever its status: a promotion of a
    rejected or unverified version, or a roll-back to an older one. Recorded with ``actor``."""
    row = get_version(session, owner, name, version)
    model = row.model
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    session.refresh(model)
    session.add(
        Promotion(
            model_id=model.id,
            version=version,
            previous_version=model.latest_version,
            previous_status=row.status,
            actor=actor,
            reason=reason,
        )
    )
    row.status = VersionStatus.PROMOTED
    model.latest_version = version
    session.flush()
    session.refresh(model)
    return model
