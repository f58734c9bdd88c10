"""Labelled image archives."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app import datasets
from app.deps import CursorQuery, LimitQuery, OwnerDep, SessionDep, SettingsDep, StorageDep
from app.errors import TooLarge
from app.routes import problems
from app.schemas import DatasetRead, Page
from app.uploads import upload_size

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], responses=problems(400, 401, 404, 409, 413, 422, 503)
)


@router.post("", status_code=201, response_model=DatasetRead)
def create_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    archive: Annotated[UploadFile, File(description=".zip, .tar or .tar.gz in ImageFolder layout")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> DatasetRead:
    size = upload_size(archive)
    if size > settings.max_upload_bytes:
        raise TooLarge(f"the archive is larger than {settings.max_upload_bytes} bytes")
    limits = datasets.ArchiveLimits(
        max_members=settings.max_archive_members,
        max_member_bytes=settings.max_member_bytes,
        max_total_bytes=settings.max_extracted_bytes,
        max_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
    )
    row = datasets.create_dataset(
        session,
        storage,
        owner,
        archive=archive.file,
        archive_size=size,
        name=name,
        limits=limits,
        tmp_root=settings.tmp_dir,
    )
    return datasets.dataset_read(row)


@router.get("", response_model=Page[DatasetRead])
def list_datasets(
    session: SessionDep, owner: OwnerDep, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Page[DatasetRead]:
    rows, next_cursor = datasets.list_datasets(session, owner, limit, cursor)
    return Page(items=[datasets.dataset_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> DatasetRead:
    return datasets.dataset_read(datasets.get_dataset(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def delete_dataset(
    dataset_id: str, session: SessionDep, storage: StorageDep, owner: OwnerDep
) -> Response:
    datasets.delete_dataset(session, storage, owner, dataset_id)
    return Response(status_code=204)
