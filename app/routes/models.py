"""Models, versions, artifacts and quick predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app import deletion, downloads, references, registration, registry
from app.deps import CursorQuery, Db, DbDep, LimitQuery, SettingsDep, StorageDep, VersionPath
from app.gate import GateConfig, defaults
from app.routes import json_response, problems
from app.schemas import (
    ARTIFACT_SUFFIXES,
    ArtifactFormat,
    ModelRead,
    ModelVersionRead,
    Page,
    PredictionsRead,
    Problem,
    PromoteRequest,
    ReferenceAdd,
    ReferenceRead,
)
from app.uploads import save_upload, upload_size
from core.disk import ensure_room
from core.errors import Invalid, NotFound, TooLarge
from core.inputs import Text
from core.scratch import scratch

MAX_PREDICT_IMAGE_BYTES = 32 * 1024 * 1024
router = APIRouter(
    prefix="/v1/models", tags=["models"], responses=problems(400, 401, 404, 409, 413, 422, 503, 507)
)
# What answers for a deleted version: anything that needs its files, or changes it.
GONE = {410: {"model": Problem, "description": "The version was deleted; its files are gone"}}
ForceQuery = Annotated[
    bool,
    Query(
        description="delete even the model's last promoted version (its latest_version becomes "
        "null), or a model whose jobs have not finished (they are stopped and deleted)"
    ),
]


@router.post("", status_code=201, response_model=ModelVersionRead)
async def register_model(
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
    name: Annotated[Text, Form(description="[a-z0-9][a-z0-9._-]{0,63}")],
    architecture: Annotated[Text, Form(max_length=200, examples=["timm:resnet18"])],
    labels: Annotated[Text, Form(description="JSON array; index = output unit")],
    weights: Annotated[
        UploadFile,
        File(
            description=".safetensors or a .pt state dict; for hf: architectures, a .zip or "
            ".tar(.gz) of the save_pretrained folder (config.json, model.safetensors, "
            "preprocessor_config.json)"
        ),
    ],
    preprocessing: Annotated[Text | None, Form(description="JSON")] = None,
    reference_dataset_id: Annotated[
        Text | None,
        Form(
            max_length=64,
            description="a dataset whose folders are labels of the model: its images become "
            "version 1's reference set",
        ),
    ] = None,
    gate: Annotated[
        Text | None,
        Form(
            max_length=2000,
            description="JSON: the gate's settings for this model's jobs (min_retention, "
            "margin, min_images, label_max_drop, new_label_min_recall, alpha); left out: the "
            "defaults",
            examples=['{"min_retention": 0.99}'],
        ),
    ] = None,
) -> Response:
    # the upload's copy, a converted copy, the stored files in three formats (local storage)
    # and the one being written
    ensure_room(settings, 6 * upload_size(weights), "this weights file")
    # Checked in one short transaction, the files stored outside any, the rows written in
    # another: a slow upload holds no lock (SQLite has one for all writers).
    checked = await db(
        lambda session, owner: registration.check_registration(
            session,
            owner,
            name=name,
            architecture=architecture,
            labels_json=labels,
            preprocessing_json=preprocessing,
            reference_dataset_id=reference_dataset_id or None,
            gate_json=gate,
        )
    )
    with scratch(settings.tmp_dir, prefix="upload-") as tmp:
        path = await run_in_threadpool(
            save_upload, weights, tmp / "weights", settings.max_upload_bytes
        )
        stored = await run_in_threadpool(
            registration.store_registration,
            storage,
            checked,
            path,
            settings,
            Path(tmp),
        )

    def record(session: Session) -> ModelVersionRead:
        version = registration.record_registration(session, stored)
        return registry.version_read(version.model, version)

    try:
        return json_response(await db.database.run(record), 201)
    except BaseException:
        await run_in_threadpool(registration.discard_registration, storage, stored)
        raise


@router.get("", response_model=Page[ModelRead])
async def list_models(
    db: DbDep, settings: SettingsDep, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Response:
    def work(session: Session, owner: str) -> Page[ModelRead]:
        rows, next_cursor = registry.list_models(session, owner, limit, cursor)
        shown = [registry.model_read(m, defaults(settings)) for m in rows]
        return Page(items=shown, next_cursor=next_cursor)

    return json_response(await db(work))


@router.get("/{name}", response_model=ModelRead)
async def get_model(name: str, db: DbDep, settings: SettingsDep) -> Response:
    def work(session: Session, owner: str) -> ModelRead:
        return registry.model_read(registry.get_model(session, owner, name), defaults(settings))

    return json_response(await db(work))


@router.put("/{name}/gate", response_model=ModelRead)
async def set_gate(name: str, body: GateConfig, db: DbDep, settings: SettingsDep) -> Response:
    """Set the gate's settings for the model's future jobs (the fields given; the others go
    back to the defaults). A job's own ``config.gate`` still overrides them; versions already
    decided keep their decision."""

    def work(session: Session, owner: str) -> ModelRead:
        model = registry.get_model(session, owner, name)
        model.gate = body.given()
        session.flush()
        return registry.model_read(model, defaults(settings))

    return json_response(await db(work))


def _version(session: Session, owner: str, name: str, version: int) -> ModelVersionRead:
    row = registry.get_version(session, owner, name, version)
    return registry.version_read(row.model, row)


@router.get("/{name}/versions/{version}", response_model=ModelVersionRead)
async def get_version(name: str, version: VersionPath, db: DbDep) -> Response:
    """The version. A deleted version still answers 200, as a tombstone: ``status``
    "deleted", ``deleted_at``, no ``formats``, no reference set, ``sha256`` and
    ``size_bytes`` null; its labels, parent, architecture, preprocessing and metrics stay, so
    the lineage of versions made from it stays readable. Everything else about a deleted
    version (download, predict, promote, reference, DELETE again) answers 410 Gone."""
    return json_response(await db(lambda session, owner: _version(session, owner, name, version)))


@router.delete(
    "/{name}/versions/{version}", status_code=204, response_class=Response, responses=GONE
)
async def delete_version(
    name: str, version: VersionPath, db: DbDep, storage: StorageDep, force: ForceQuery = False
) -> Response:
    """Delete a version's files (every format, its reference set) and keep its record as a
    tombstone (see GET). Version numbers are never reused. If it was the model's latest
    version, ``latest_version`` moves to the newest promoted version left (null if none).

    409 while a queued or running job uses the version (as its base, or to score it),
    whatever ``force``: cancel the job first. 409 without ``force=true`` if it is the model's
    last promoted version and the model has other versions or unfinished jobs. 410 if it was
    already deleted. Files the store cannot delete at once are removed by the next sweep."""
    # ``db`` commits before it returns: the files go only once the deletion stands.
    removal = await db(
        lambda session, owner: deletion.delete_version(session, owner, name, version, force)
    )
    await run_in_threadpool(deletion.remove_files, storage, removal)
    return Response(status_code=204)


@router.delete("/{name}", status_code=204, response_class=Response)
async def delete_model(
    name: str, db: DbDep, storage: StorageDep, force: ForceQuery = False
) -> Response:
    """Delete the model: every version's files, and its record, versions, promotions and
    jobs (finished ones included: GET /v1/jobs/{id} of them answers 404 after). The name is
    free again at once.

    409 while a job on the model is queued or running, unless ``force=true``: then those
    jobs are stopped and deleted with it (a running job's worker notices within seconds and
    keeps nothing). Files the store cannot delete at once are removed by the next sweep."""
    removal = await db(lambda session, owner: deletion.delete_model(session, owner, name, force))
    for job_id in removal.job_ids:
        db.poll_cache.changed(job_id)
    await run_in_threadpool(deletion.remove_files, storage, removal)
    return Response(status_code=204)


@router.post("/{name}/versions/{version}/reference", response_model=ReferenceRead, responses=GONE)
async def add_reference(
    name: str,
    version: VersionPath,
    body: ReferenceAdd,
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    """Add a dataset's images of the version's labels to its reference set (at most
    GRAFT_REFERENCE_PER_LABEL per label); jobs built on the version learn from them and
    measure retention on them."""

    def work(session: Session, owner: str) -> tuple[ReferenceRead, str | None]:
        row = deletion.live_version(session, owner, name, version)
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


@router.post("/{name}/versions/{version}/promote", response_model=ModelRead, responses=GONE)
async def promote_version(
    name: str,
    version: VersionPath,
    db: DbDep,
    settings: SettingsDep,
    body: PromoteRequest | None = None,
) -> Response:
    """Make this version the model's latest on purpose: promote a held, rejected or
    unverified version, or roll back to an older one. Recorded in the model's ``promotions``."""

    def work(session: Session, owner: str) -> ModelRead:
        deletion.live_version(session, owner, name, version)
        model = registry.promote_version(
            session, owner, name, version, db.actor(owner), body.reason if body else None
        )
        return registry.model_read(model, defaults(settings))

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
        lambda session, owner: dict(deletion.live_version(session, owner, name, version).artifacts)
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
        **GONE,
    },
)
async def download_artifact(
    name: str,
    version: VersionPath,
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
        **GONE,
    },
)
async def artifact_headers(
    name: str,
    version: VersionPath,
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


@router.post("/{name}/versions/{version}/predict", response_model=PredictionsRead, responses=GONE)
async def predict_images(
    name: str,
    version: VersionPath,
    request: Request,
    db: DbDep,
    storage: StorageDep,
    image: Annotated[list[UploadFile], File(description="one or more images")],
    top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
) -> Response:
    if len(image) > 64:
        raise Invalid("at most 64 images per request", "image")
    row = await db(lambda session, owner: deletion.live_version(session, owner, name, version))

    def predict() -> PredictionsRead:
        predictor = request.app.state.predictors.get(row, storage)
        images = [f.file.read(MAX_PREDICT_IMAGE_BYTES + 1) for f in image]
        if any(len(data) > MAX_PREDICT_IMAGE_BYTES for data in images):
            raise TooLarge(f"each image may be at most {MAX_PREDICT_IMAGE_BYTES} bytes")
        return PredictionsRead(predictions=predictor.predict(images, top_k))

    return json_response(await run_in_threadpool(predict))
