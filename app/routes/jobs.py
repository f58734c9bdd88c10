"""Jobs: submit (202), read, list, cancel, and a live event stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from app import jobs, reports
from app.db import session_scope
from app.deps import CursorQuery, LimitQuery, OwnerDep, SessionDep, SettingsDep
from app.errors import Conflict
from app.models import JobStatus
from app.queue import publish_jobs
from app.routes import problems
from app.schemas import JobCreate, JobRead, Page

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=problems(400, 401, 404, 409, 413, 422, 503)
)
StatusQuery = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.post("", status_code=202, response_model=JobRead)
def submit_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobRead:
    job, created = jobs.create_job(session, settings, owner, body, idempotency_key)
    read = jobs.job_read(job)
    session.commit()  # the row exists before the doorbell rings
    if created:
        publish_jobs(settings, [job.id])
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return read


@router.get("", response_model=Page[JobRead])
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    status: StatusQuery | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[JobRead]:
    rows, next_cursor = jobs.list_jobs(
        session, owner, status=status, model=model, limit=limit, cursor=cursor
    )
    return Page(items=[jobs.job_read(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobRead:
    return jobs.job_read(jobs.get_job(session, owner, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead)
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobRead:
    return jobs.job_read(jobs.cancel_job(session, owner, job_id))


def _finished(session: Session, owner: str, job_id: str) -> JobRead:
    job = jobs.job_read(jobs.get_job(session, owner, job_id))
    if job.status != "succeeded" or not job.metrics:
        raise Conflict(f"job {job_id} is {job.status}; reports exist for succeeded jobs")
    return job


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the report"}},
)
def job_report(job_id: str, session: SessionDep, owner: OwnerDep) -> HTMLResponse:
    """A self-contained HTML page: old classes before/after, new classes, confusion matrix,
    training curve."""
    return HTMLResponse(reports.render_html(_finished(session, owner, job_id)))


@router.get(
    "/{job_id}/report.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the charts"}},
)
def job_report_png(job_id: str, session: SessionDep, owner: OwnerDep) -> Response:
    """The report's charts as a PNG."""
    return Response(reports.render_png(_finished(session, owner, job_id)), media_type="image/png")


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str, request: Request, settings: SettingsDep, owner: OwnerDep
) -> StreamingResponse:
    """Server-sent events: ``progress`` while the job changes, ``status`` when its status
    changes; the stream ends after the final status."""
    url = settings.resolved_database_url

    def load() -> JobRead:
        with session_scope(url) as session:
            return jobs.job_read(jobs.get_job(session, owner, job_id))

    first = await run_in_threadpool(load)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        last, last_status, sent = None, None, 0
        job = first
        while True:
            payload = job.model_dump_json()
            if payload != last:
                kind = "status" if job.status != last_status else "progress"
                sent += 1
                yield f"event: {kind}\nid: {sent}\ndata: {payload}\n\n"
                last, last_status = payload, job.status
            if JobStatus(job.status).is_final or await request.is_disconnected():
                return
            await asyncio.sleep(0.5)
            job = await run_in_threadpool(load)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
