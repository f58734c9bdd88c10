"""Labelled image archives."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app import datasets
from app.deps import CursorQuery, DbDep, LimitQuery, SettingsDep, StorageDep
from app.disk import ensure_room
from app.errors import TooLarge
from app.routes import json_response, problems
from app.schemas import DatasetRead, Page
from app.uploads import upload_size

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=problems(400, 401, 404, 409, 413, 422, 503, 507),
)


@router.post("", status_code=201, response_model=DatasetRead)
async def create_dataset(
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
    archive: Annotated[UploadFile, File(description=".zip, .tar or .tar.gz in ImageFolder layout")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> Response:
    owner = await db.owner()
    size = upload_size(archive)
    if size > settings.max_upload_bytes:
        raise TooLarge(f"the archive is larger than {settings.max_upload_bytes} bytes")
    # the images, unpacked and packed again, and the stored copy (local storage)
    ensure_room(settings, 3 * size, "this archive")
    limits = datasets.ArchiveLimits(
        max_members=settings.max_archive_members,
        max_member_bytes=settings.max_member_bytes,
        max_total_bytes=settings.max_extracted_bytes,
        max_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
    )
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
                datasets.get_dataset(session, owner, dataset_id)
            )
        )
    )


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
async def delete_dataset(dataset_id: str, db: DbDep, storage: StorageDep) -> Response:
    # ``db`` commits before it returns: the images go only once the deletion stands.
    key = await db(lambda session, owner: datasets.delete_dataset(session, owner, dataset_id))
    await run_in_threadpool(datasets.remove_images, storage, key)
    return Response(status_code=204)
