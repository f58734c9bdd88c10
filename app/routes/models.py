"""Models, versions, artifacts and quick predictions."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app import downloads, references, registry
from app.deps import CursorQuery, Db, DbDep, LimitQuery, SettingsDep, StorageDep
from app.disk import ensure_room
from app.errors import Invalid, NotFound, TooLarge
from app.routes import json_response, problems
from app.schemas import (
    ARTIFACT_SUFFIXES,
    ArtifactFormat,
    ModelRead,
    ModelVersionRead,
    Page,
    PredictionsRead,
    PromoteRequest,
    ReferenceAdd,
    ReferenceRead,
)
from app.uploads import save_upload, upload_size

MAX_PREDICT_IMAGE_BYTES = 32 * 1024 * 1024
router = APIRouter(
    prefix="/v1/models", tags=["models"], responses=problems(400, 401, 404, 409, 413, 422, 503, 507)
)


@router.post("", status_code=201, response_model=ModelVersionRead)
async def register_model(
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
    name: Annotated[str, Form(description="[a-z0-9][a-z0-9._-]{0,63}")],
    architecture: Annotated[str, Form(examples=["timm:resnet18"])],
    labels: Annotated[str, Form(description="JSON array; index = output unit")],
    weights: Annotated[
        UploadFile,
        File(
            description=".safetensors or a .pt state dict; for hf: architectures, a .zip or "
            ".tar(.gz) of the save_pretrained folder (config.json, model.safetensors, "
            "preprocessor_config.json)"
        ),
    ],
    preprocessing: Annotated[str | None, Form(description="JSON")] = None,
    reference_dataset_id: Annotated[
        str | None,
        Form(
            max_length=64,
            description="a dataset whose folders are labels of the model: its images become "
            "version 1's reference set",
        ),
    ] = None,
) -> Response:
    # the upload's copy, a converted copy, the stored files in three formats (local storage)
    # and the one being written
    ensure_room(settings, 6 * upload_size(weights), "these weights")
    # Checked in one short transaction, the files stored outside any, the rows written in
    # another: a slow upload holds no lock (SQLite has one for all writers).
    checked = await db(
        lambda session, owner: registry.check_registration(
            session,
            owner,
            name=name,
            architecture=architecture,
            labels_json=labels,
            preprocessing_json=preprocessing,
            reference_dataset_id=reference_dataset_id or None,
        )
    )
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir) as tmp:
        path = await run_in_threadpool(
            save_upload, weights, Path(tmp) / "weights", settings.max_upload_bytes
        )
        stored = await run_in_threadpool(
            registry.store_registration,
            storage,
            checked,
            path,
            settings.reference_per_label,
            Path(tmp),
        )

    def record(session: Session) -> ModelVersionRead:
        version = registry.record_registration(session, stored)
        return registry.version_read(version.model, version)

    try:
        return json_response(await db.database.run(record), 201)
    except BaseException:
        await run_in_threadpool(registry.discard_registration, storage, stored)
        raise


@router.get("", response_model=Page[ModelRead])
async def list_models(db: DbDep, limit: LimitQuery = 50, cursor: CursorQuery = None) -> Response:
    def work(session: Session, owner: str) -> Page[ModelRead]:
        rows, next_cursor = registry.list_models(session, owner, limit, cursor)
        return Page(items=[registry.model_read(m) for m in rows], next_cursor=next_cursor)

    return json_response(await db(work))


@router.get("/{name}", response_model=ModelRead)
async def get_model(name: str, db: DbDep) -> Response:
    def work(session: Session, owner: str) -> ModelRead:
        return registry.model_read(registry.get_model(session, owner, name))

    return json_response(await db(work))


def _version(session: Session, owner: str, name: str, version: int) -> ModelVersionRead:
    row = registry.get_version(session, owner, name, version)
    return registry.version_read(row.model, row)


@router.get("/{name}/versions/{version}", response_model=ModelVersionRead)
async def get_version(name: str, version: int, db: DbDep) -> Response:
    return json_response(await db(lambda session, owner: _version(session, owner, name, version)))


@router.post("/{name}/versions/{version}/reference", response_model=ReferenceRead)
async def add_reference(
    name: str,
    version: int,
    body: ReferenceAdd,
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """Add a dataset's images of the version's labels to its reference set (at most
    GRAFT_REFERENCE_PER_LABEL per label); jobs built on the version learn from them and
    measure retention on them."""

    def work(session: Session, owner: str) -> tuple[ReferenceRead, str | None]:
        row = registry.get_version(session, owner, name, version)
        dataset = references.dataset_for_reference(session, owner, body.dataset_id, "dataset_id")
        added, ignored, replaced = references.add_reference(
            session, storage, row, dataset, settings.reference_per_label, settings.tmp_dir
        )
        read = ReferenceRead(
            name=name,
            version=version,
            reference=row.reference_counts,
            added=added,
            ignored_labels=ignored,
        )
        return read, replaced

    read, replaced = await db(work)
    if replaced:  # the old manifest, once the new one is committed
        await run_in_threadpool(storage.delete, replaced)
    return json_response(read)


@router.post("/{name}/versions/{version}/promote", response_model=ModelRead)
async def promote_version(
    name: str, version: int, db: DbDep, body: PromoteRequest | None = None
) -> Response:
    """Make this version the model's latest on purpose: promote a rejected or unverified
    version, or roll back to an older one. Recorded in the model's ``promotions``."""

    def work(session: Session, owner: str) -> ModelRead:
        model = registry.promote_version(
            session, owner, name, version, db.actor(owner), body.reason if body else None
        )
        return registry.model_read(model)

    return json_response(await db(work))


ARTIFACT_PATH = "/{name}/versions/{version}/artifact"
FormatQuery = Annotated[
    ArtifactFormat,
    Query(description="safetensors (always there), onnx or torchscript: see the version's formats"),
]
RangeHeader = Annotated[
    str | None,
    Header(
        alias="Range",
        description="one byte range, 'bytes=FIRST-LAST', 'bytes=FIRST-' or 'bytes=-LENGTH': "
        "206 with those bytes (to resume a download)",
        examples=["bytes=1048576-"],
    ),
]
IfRangeHeader = Annotated[
    str | None,
    Header(
        alias="If-Range",
        description="the ETag of the partial copy: the range is answered only if the file is "
        "still that one, else the whole file",
    ),
]
_ARTIFACT_HEADERS = {
    "ETag": {"description": "the file's sha256, quoted", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "bytes", "schema": {"type": "string"}},
    "Content-Length": {"description": "bytes in this answer", "schema": {"type": "integer"}},
    "Content-Disposition": {"description": "the file's name", "schema": {"type": "string"}},
}
_FILE_EXAMPLE = {"application/octet-stream": {"example": "(binary)"}}


async def _artifact(db: Db, name: str, version: int, format: str) -> tuple[dict[str, Any], str]:
    """The stored file of ``format`` of a version, and the name to download it as; 404
    naming the formats the version has if it lacks this one."""
    artifacts = await db(
        lambda session, owner: dict(registry.get_version(session, owner, name, version).artifacts)
    )
    artifact = artifacts.get(format)
    if artifact is None:
        raise NotFound(
            f"version {version} of {name!r} has no {format} file (it was stored before Graft "
            f"wrote {format}, or its architecture cannot be exported to {format}); "
            f"available: {', '.join(artifacts)}"
        )
    return artifact, f"{name}-v{version}{ARTIFACT_SUFFIXES[format]}"


@router.get(
    ARTIFACT_PATH,
    response_class=StreamingResponse,
    responses={
        200: {"content": _FILE_EXAMPLE, "description": "the file", "headers": _ARTIFACT_HEADERS},
        206: {
            "content": _FILE_EXAMPLE,
            "description": "the bytes of the range asked for; Content-Range says which",
            "headers": _ARTIFACT_HEADERS,
        },
        **problems(416),
    },
)
async def download_artifact(
    name: str,
    version: int,
    db: DbDep,
    storage: StorageDep,
    format: FormatQuery = "safetensors",
    range: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """The artifact, streamed, with its sha256 as ETag; one byte range of it with ``Range``."""
    artifact, filename = await _artifact(db, name, version, format)
    return await run_in_threadpool(
        downloads.artifact_response, storage, artifact, filename, range, if_range, True
    )


@router.head(
    ARTIFACT_PATH,
    response_class=Response,
    responses={
        200: {"description": "the file's headers, no body", "headers": _ARTIFACT_HEADERS},
        206: {"description": "the range's headers, no body", "headers": _ARTIFACT_HEADERS},
        **problems(416),
    },
)
async def artifact_headers(
    name: str,
    version: int,
    db: DbDep,
    storage: StorageDep,
    format: FormatQuery = "safetensors",
    range: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """What a GET of the artifact would answer (size, ETag = sha256, name), without the
    file."""
    artifact, filename = await _artifact(db, name, version, format)
    return downloads.artifact_response(storage, artifact, filename, range, if_range, False)


@router.post("/{name}/versions/{version}/predict", response_model=PredictionsRead)
async def predict_images(
    name: str,
    version: int,
    request: Request,
    db: DbDep,
    storage: StorageDep,
    image: Annotated[list[UploadFile], File(description="one or more images")],
    top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
) -> Response:
    if len(image) > 64:
        raise Invalid("at most 64 images per request", "image")
    row = await db(lambda session, owner: registry.get_version(session, owner, name, version))

    def predict() -> PredictionsRead:
        predictor = request.app.state.predictors.get(row, storage)
        images = [f.file.read(MAX_PREDICT_IMAGE_BYTES + 1) for f in image]
        if any(len(data) > MAX_PREDICT_IMAGE_BYTES for data in images):
            raise TooLarge(f"each image may be at most {MAX_PREDICT_IMAGE_BYTES} bytes")
        return PredictionsRead(predictions=predictor.predict(images, top_k))

    return json_response(await run_in_threadpool(predict))
