"""Labelled image archives, uploaded or registered by reference (app.imports)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app import archives, datasets, imports
from app.deps import CursorQuery, DbDep, LimitQuery, SettingsDep, StorageDep
from app.routes import json_response, problems
from app.schemas import DatasetImport, DatasetRead, Page, Problem
from app.uploads import upload_size
from core.disk import ensure_room
from core.errors import Invalid, TooLarge
from core.inputs import Text
from core.janitor import remove_decoded

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=problems(400, 401, 404, 409, 413, 422, 503, 507),
)


BY_REFERENCE = {
    "requestBody": {
        "content": {"application/json": {"schema": DatasetImport.model_json_schema()}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    openapi_extra=BY_REFERENCE,
    responses={
        202: {
            "model": DatasetRead,
            "description": "Registered by reference (JSON body): status importing; "
            "`Location` is the dataset, which becomes ready or failed",
        },
        403: {
            "model": Problem,
            "description": "Importing by reference is off (GRAFT_IMPORT_BUCKETS), or the "
            "bucket is not one the server imports from",
        },
    },
)
async def create_dataset(
    request: Request,
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
    archive: Annotated[
        UploadFile | None, File(description=".zip, .tar or .tar.gz in ImageFolder layout")
    ] = None,
    name: Annotated[Text | None, Form(max_length=200)] = None,
) -> Response:
    """Upload an archive (multipart), or register images already in S3 (JSON
    `{"source": "s3://bucket/prefix/"}` or `{"manifest": "s3://bucket/list.csv"}`)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        return await import_dataset(request, db, settings)
    if archive is None:
        raise Invalid(
            "archive: Field required", errors=[{"field": "archive", "message": "Field required"}]
        )
    owner = await db.owner()
    size = upload_size(archive)
    if size > settings.max_upload_bytes:
        raise TooLarge(f"the archive is larger than {settings.max_upload_bytes} bytes")
    # the images, unpacked and packed again, and the stored copy (local storage)
    ensure_room(settings, 3 * size, "this archive")
    limits = archives.archive_limits(settings)
    # The images are checked and stored outside any transaction; the row is written after.
    row = await run_in_threadpool(
        datasets.build_dataset,
        storage,
        owner,
        archive=archive.file,
        archive_size=size,
        name=name,
        limits=limits,
        tmp_root=settings.tmp_dir,
    )
    return json_response(await db.database.run(lambda s: datasets.add_dataset(s, row)), 201)


async def import_dataset(request: Request, db: DbDep, settings: SettingsDep) -> Response:
    try:
        body = DatasetImport.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    await db.owner()  # the key is checked before the store is asked anything
    source = await run_in_threadpool(imports.check_request, settings, body)
    row = await db(lambda session, owner: imports.register(session, owner, body.name, source))
    if importer := getattr(request.app.state, "importer", None):
        importer.wake()
    return json_response(
        datasets.dataset_read(row), 202, headers={"Location": f"/v1/datasets/{row.id}"}
    )


@router.get("", response_model=Page[DatasetRead])
async def list_datasets(db: DbDep, limit: LimitQuery = 50, cursor: CursorQuery = None) -> Response:
    def work(session: Session, owner: str) -> Page[DatasetRead]:
        rows, next_cursor = datasets.list_datasets(session, owner, limit, cursor)
        return Page(items=[datasets.dataset_read(r) for r in rows], next_cursor=next_cursor)

    return json_response(await db(work))


@router.get("/{dataset_id}", response_model=DatasetRead)
async def get_dataset(dataset_id: str, db: DbDep) -> Response:
    return json_response(
        await db(
            lambda session, owner: datasets.dataset_read(
                datasets.find_dataset(session, owner, dataset_id)
            )
        )
    )


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
async def delete_dataset(
    dataset_id: str, db: DbDep, storage: StorageDep, settings: SettingsDep
) -> Response:
    # ``db`` commits before it returns: the images go only once the deletion stands.
    key = await db(lambda session, owner: datasets.delete_dataset(session, owner, dataset_id))
    await run_in_threadpool(datasets.remove_images, storage, key)
    await run_in_threadpool(remove_decoded, settings, dataset_id)
    return Response(status_code=204)
