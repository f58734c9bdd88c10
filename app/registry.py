"""Models and their versions: registration, lookup, and adding a version atomically."""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app import datasets, model_uploads, references
from app.gate import parse_gate
from app.schemas import (
    NAME_PATTERN,
    NAME_RULE,
    ModelRead,
    ModelVersionRead,
    PreprocessingSpec,
    PromotionRead,
    VersionSummary,
)
from core.db import paginate
from core.errors import Conflict, Invalid, NotFound
from core.inputs import control_character_at
from core.models import Dataset, Model, ModelVersion, Promotion, VersionStatus, new_id
from core.scratch import scratch
from core.settings import Settings
from core.storage import Storage, StoredObject
from core.versions import add_version, artifact_metadata
from engine import intake, sandbox
from engine.architectures import default_preprocessing, parse_architecture
from engine.errors import EngineError
from engine.export import PORTABLE
from engine.formats import SAFETENSORS, SUFFIXES
from engine.preprocessing import Preprocessing

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)
EXPORTS = PORTABLE  # what version 1 gets besides safetensors (and its family's own format)


def parse_labels(raw: str) -> list[str]:
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Invalid(f"labels must be a JSON array of strings: {exc.msg}", "labels") from None
    if not isinstance(labels, list) or not labels:
        raise Invalid("labels must be a non-empty JSON array of strings", "labels")
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise Invalid("every label must be a non-empty string", "labels")
    if (where := control_character_at(labels, "labels")) or any(len(x) > 200 for x in labels):
        raise Invalid(
            f"{where or 'labels'}: labels must be printable and at most 200 characters", "labels"
        )
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


@dataclass
class Registration:
    """A checked registration request, and (once ``store_registration`` ran) its files."""

    owner: str
    name: str
    architecture: str
    labels: list[str]
    preprocessing: Preprocessing
    dataset: Dataset | None
    preprocessing_given: bool = True  # else the architecture's (or the model folder's) default
    model_id: str = field(default_factory=new_id)
    version_id: str = field(default_factory=new_id)
    files: dict[str, StoredObject] = field(default_factory=dict)  # by format
    reference: dict[str, Any] | None = None
    written: list[str] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)  # the model's gate settings, as given


def check_registration(
    session: Session,
    owner: str,
    *,
    name: str,
    architecture: str,
    labels_json: str,
    preprocessing_json: str | None,
    reference_dataset_id: str | None = None,
    gate_json: str | None = None,
) -> Registration:
    """Everything about a registration that needs no file: 409/422 before a byte is stored."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise Invalid(f"{name!r} cannot be a model's name: {NAME_RULE}", "name")
    if find_model(session, owner, name) is not None:
        raise Conflict(f"a model named {name!r} already exists")
    labels = parse_labels(labels_json)
    try:
        parse_architecture(architecture)
    except EngineError as exc:  # unknown, or its optional dependency is not installed
        raise Invalid(str(exc), "architecture") from None
    prep = parse_preprocessing(preprocessing_json, architecture)
    gate = parse_gate(gate_json)
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
    return Registration(
        owner,
        name,
        architecture,
        labels,
        prep,
        dataset,
        preprocessing_given=bool(preprocessing_json),
        gate=gate,
    )


def store_registration(
    storage: Storage,
    registration: Registration,
    upload: Path,
    settings: Settings,
    tmp_root: Path,
) -> Registration:
    """Check the model and store version 1's files (outside any transaction). The upload is
    opened, run and written out only in a bounded process (:mod:`engine.intake`):
    version 1 gets its safetensors file, ONNX and TorchScript where they reproduce the model
    (and its family's own format), each run in its own runtime first; then the reference
    dataset's images. A model refused there is a 422 naming the field at fault."""
    r = registration
    limits = sandbox.Limits(
        memory_bytes=settings.model_check_memory_bytes,
        wall_s=settings.model_check_timeout_s,
        file_bytes=2 * upload.stat().st_size + 1024**3,
    )
    try:
        with scratch(tmp_root, prefix="model-") as folder:
            source = _unpacked(r.architecture, upload, folder / "upload", settings)
            try:
                answer = intake.check_model(
                    folder,
                    architecture=r.architecture,
                    labels=r.labels,
                    upload=source,
                    preprocessing=r.preprocessing.to_dict() if r.preprocessing_given else None,
                    exports=list(EXPORTS),
                    metadata=artifact_metadata(
                        r.name, r.architecture, r.labels, r.preprocessing.to_dict(), None
                    ),
                    limits=limits,
                )
            except sandbox.Refused as exc:
                raise Invalid(str(exc), exc.field) from None
            r.preprocessing = Preprocessing.from_dict(answer["preprocessing"])
            log.info("model %s: %s", r.name, answer["model"])
            for fmt, name in answer["files"].items():
                key = f"models/{r.model_id}/{r.version_id}/model{SUFFIXES[fmt]}"
                r.files[fmt] = storage.put_file(key, folder / name)
                r.written.append(key)
            for fmt, why in answer["failed"].items():
                log.warning("model %s: no %s file: %s", r.name, fmt, why)
        if r.dataset is not None:
            r.reference, _, images = references.extend_reference(
                storage,
                r.model_id,
                r.version_id,
                None,
                r.dataset,
                set(r.labels),
                settings.reference_per_label,
                tmp_root,
            )
            if r.reference is not None:
                r.written += images + [r.reference["manifest"]["key"]]
    except BaseException:
        discard_registration(storage, r)
        raise
    return r


HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def _unpacked(architecture: str, upload: Path, folder: Path, settings: Settings) -> Path:
    """What the sandbox opens: the upload itself, or the folder its archive unpacks to (a
    Hugging Face ``save_pretrained`` folder; an ONNX graph with its data files)."""
    if problem := model_uploads.kind_problem(architecture, upload):
        raise Invalid(problem, "weights")
    family = architecture.partition(":")[0]
    if family not in ("hf", "onnx") or not model_uploads.is_archive(upload):
        if family == "hf":
            raise Invalid(
                "a Hugging Face model is sent as a .zip or .tar(.gz) of its save_pretrained folder",
                "weights",
            )
        return upload
    folder.mkdir()
    model_uploads.unpack(
        upload,
        folder,
        datasets.archive_limits(settings),
        settings.max_upload_bytes,
        # only the files from_pretrained needs (no code, no pickle), flattened; an ONNX
        # graph's folder as it is
        (lambda parts: parts[-1:] if parts[-1] in HF_FILES else None)
        if family == "hf"
        else (lambda parts: parts),
    )
    return folder


def discard_registration(storage: Storage, registration: Registration) -> None:
    """Delete what ``store_registration`` wrote: the model is new, nothing else points at it."""
    for key in registration.written:
        storage.delete(key)


def record_registration(session: Session, registration: Registration) -> ModelVersion:
    """Write the model and its version 1 (a short transaction); 409 if the name was taken
    meanwhile, in which case the caller discards the files."""
    r = registration
    row = Model(id=r.model_id, owner=r.owner, name=r.name, gate=r.gate or None)
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a model named {r.name!r} already exists") from None
    assert SAFETENSORS in r.files
    return add_version(
        session,
        row,
        version_id=r.version_id,
        parent_version=None,
        job_id=None,
        architecture=r.architecture,
        labels=r.labels,
        preprocessing=r.preprocessing.to_dict(),
        status=VersionStatus.PROMOTED,
        metrics=None,
        artifacts={fmt: asdict(obj) for fmt, obj in r.files.items()},
        reference=r.reference,
    )


def find_model(session: Session, owner: str, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.owner == owner, Model.name == name))


def no_model(session: Session, owner: str, name: str) -> str:
    """Why ``name`` is not found: says which of the owner's models is named most like it."""
    names = session.scalars(select(Model.name).where(Model.owner == owner)).all()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"no model named {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


# What model_read shows, loaded in one query each rather than one per model.
WITH_VERSIONS = (selectinload(Model.versions), selectinload(Model.promotions))


def get_model(session: Session, owner: str, name: str) -> Model:
    model = session.scalar(
        select(Model).where(Model.owner == owner, Model.name == name).options(*WITH_VERSIONS)
    )
    if model is None:
        raise NotFound(no_model(session, owner, name))
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
    query = select(Model).where(Model.owner == owner).options(*WITH_VERSIONS)
    return paginate(session, query, Model.name, limit, cursor)


def version_read(model: Model, version: ModelVersion) -> ModelVersionRead:
    # a deleted version has no files: it is read as what it was, with nothing to download
    main = version.artifacts.get(SAFETENSORS) or {"sha256": None, "size_bytes": None}
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
        deleted_at=version.deleted_at,
    )


def model_read(model: Model, gate_defaults: dict[str, Any] | None = None) -> ModelRead:
    """``gate_defaults``: the server's gate defaults, shown under the model's own settings."""
    return ModelRead(
        gate=(gate_defaults or {}) | (model.gate or {}),
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
                deleted_at=v.deleted_at,
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
    session.refresh(row)
    if row.deleted_at is not None:  # deleted while this request waited for the lock
        raise Conflict(f"version {version} of {name!r} was deleted")
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
