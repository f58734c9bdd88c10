"""Registering a model: its form checked, its bytes parsed and run in a bounded subprocess
(``engine.sandbox``), its files written and each run in its own runtime, then version 1
recorded. Nothing is recorded unless every step succeeded."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import archives, model_uploads, references
from app.gate import parse_gate
from app.registry import find_model
from app.schemas import (
    NAME_PATTERN,
    NAME_RULE,
    PreprocessingSpec,
)
from core.errors import Conflict, Invalid
from core.inputs import control_character_at
from core.models import Dataset, Model, ModelVersion, VersionStatus, new_id
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
        archives.archive_limits(settings),
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
