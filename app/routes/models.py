"""Models, versions, artifacts and quick predictions."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from app import references, registry
from app.deps import (
    ActorDep,
    CursorQuery,
    LimitQuery,
    OwnerDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from app.errors import Invalid, NotFound, TooLarge
from app.routes import problems
from app.schemas import (
    ModelRead,
    ModelVersionRead,
    Page,
    PredictionsRead,
    PromoteRequest,
    ReferenceAdd,
    ReferenceRead,
)
from app.storage import iter_chunks
from app.uploads import save_upload

MAX_PREDICT_IMAGE_BYTES = 32 * 1024 * 1024
router = APIRouter(
    prefix="/v1/models", tags=["models"], responses=problems(400, 401, 404, 409, 413, 422, 503)
)


@router.post("", status_code=201, response_model=ModelVersionRead)
def register_model(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    name: Annotated[str, Form(description="[a-z0-9][a-z0-9._-]{0,63}")],
    architecture: Annotated[str, Form(examples=["timm:resnet18"])],
    labels: Annotated[str, Form(description="JSON array; index = output unit")],
    weights: Annotated[UploadFile, File(description=".safetensors or a .pt state dict")],
    preprocessing: Annotated[str | None, Form(description="JSON")] = None,
    reference_dataset_id: Annotated[
        str | None,
        Form(
            max_length=64,
            description="a dataset whose folders are labels of the model: its images become "
            "version 1's reference set",
        ),
    ] = None,
) -> ModelVersionRead:
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir) as tmp:
        path = save_upload(weights, Path(tmp) / "weights", settings.max_upload_bytes)
        version = registry.register_model(
            session,
            storage,
            owner,
            name=name,
            architecture=architecture,
            labels_json=labels,
            weights=path,
            preprocessing_json=preprocessing,
            reference_dataset_id=reference_dataset_id or None,
            reference_per_label=settings.reference_per_label,
            tmp_root=Path(tmp),
        )
    return registry.version_read(version.model, version)


@router.get("", response_model=Page[ModelRead])
def list_models(
    session: SessionDep, owner: OwnerDep, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Page[ModelRead]:
    rows, next_cursor = registry.list_models(session, owner, limit, cursor)
    return Page(items=[registry.model_read(m) for m in rows], next_cursor=next_cursor)


@router.get("/{name}", response_model=ModelRead)
def get_model(name: str, session: SessionDep, owner: OwnerDep) -> ModelRead:
    return registry.model_read(registry.get_model(session, owner, name))


@router.get("/{name}/versions/{version}", response_model=ModelVersionRead)
def get_version(name: str, version: int, session: SessionDep, owner: OwnerDep) -> ModelVersionRead:
    row = registry.get_version(session, owner, name, version)
    return registry.version_read(row.model, row)


@router.post("/{name}/versions/{version}/reference", response_model=ReferenceRead)
def add_reference(
    name: str,
    version: int,
    body: ReferenceAdd,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> ReferenceRead:
    """Add a dataset's images of the version's labels to its reference set (at most
    GRAFT_REFERENCE_PER_LABEL per label); jobs built on the version learn from them and
    measure retention on them."""
    row = registry.get_version(session, owner, name, version)
    dataset = references.dataset_for_reference(session, owner, body.dataset_id, "dataset_id")
    added, ignored, replaced = references.add_reference(
        session, storage, row, dataset, settings.reference_per_label, settings.tmp_dir
    )
    session.commit()
    if replaced:
        storage.delete(replaced)
    return ReferenceRead(
        name=name,
        version=version,
        reference=row.reference_counts,
        added=added,
        ignored_labels=ignored,
    )


@router.post("/{name}/versions/{version}/promote", response_model=ModelRead)
def promote_version(
    name: str,
    version: int,
    session: SessionDep,
    owner: OwnerDep,
    actor: ActorDep,
    body: PromoteRequest | None = None,
) -> ModelRead:
    """Make this version the model's latest on purpose: promote a rejected or unverified
    version, or roll back to an older one. Recorded in the model's ``promotions``."""
    model = registry.promote_version(
        session, owner, name, version, actor, body.reason if body else None
    )
    return registry.model_read(model)


@router.get(
    "/{name}/versions/{version}/artifact",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"}},
)
def download_artifact(
    name: str,
    version: int,
    session: SessionDep,
    storage: StorageDep,
    owner: OwnerDep,
    format: Annotated[Literal["safetensors", "onnx", "torchscript"], Query()] = "safetensors",
) -> StreamingResponse:
    """The artifact, streamed, with its sha256 as ETag."""
    row = registry.get_version(session, owner, name, version)
    artifact = row.artifacts.get(format)
    if artifact is None:
        raise NotFound(
            f"version {version} of {name!r} has no {format} artifact; "
            f"available: {', '.join(row.artifacts)}"
        )
    return StreamingResponse(
        iter_chunks(storage.open(artifact["key"])),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(artifact["size_bytes"]),
            "Content-Disposition": f'attachment; filename="{name}-v{version}.{format}"',
            "ETag": f'"{artifact["sha256"]}"',
        },
    )


@router.post("/{name}/versions/{version}/predict", response_model=PredictionsRead)
def predict_images(
    name: str,
    version: int,
    request: Request,
    session: SessionDep,
    storage: StorageDep,
    owner: OwnerDep,
    image: Annotated[list[UploadFile], File(description="one or more images")],
    top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
) -> PredictionsRead:
    row = registry.get_version(session, owner, name, version)
    if len(image) > 64:
        raise Invalid("at most 64 images per request", "image")
    predictor = request.app.state.predictors.get(row, storage)
    images = [f.file.read(MAX_PREDICT_IMAGE_BYTES + 1) for f in image]
    if any(len(data) > MAX_PREDICT_IMAGE_BYTES for data in images):
        raise TooLarge(f"each image may be at most {MAX_PREDICT_IMAGE_BYTES} bytes")
    return PredictionsRead(predictions=predictor.predict(images, top_k))
