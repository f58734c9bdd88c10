"""Jobs: submit (202), read, list, cancel, and a live event stream."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from app import jobs, reports
from app.deps import CursorQuery, Db, DbDep, LimitQuery, SettingsDep
from app.pollcache import Window
from app.routes import json_response, problems
from app.schemas import JobCreate, JobRead, Page
from core.errors import Conflict
from core.queue import publish_jobs
from core.settings import Settings

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=problems(400, 401, 404, 409, 413, 422, 503)
)
StatusQuery = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@router.post("", status_code=202, response_model=JobRead)
async def submit_job(
    body: JobCreate,
    db: DbDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    read, created = await db(
        lambda session, owner: _submit(session, settings, owner, body, idempotency_key)
    )
    if created:  # the row is committed before the doorbell rings
        await run_in_threadpool(publish_jobs, settings, [read.id])
        db.poll_cache.changed(read.id)
    return json_response(read, 202, {"Location": f"/v1/jobs/{read.id}"})


def _submit(
    session: Session, settings: Settings, owner: str, body: JobCreate, key: str | None
) -> tuple[JobRead, bool]:
    job, created = jobs.create_job(session, settings, owner, body, key)
    return jobs.job_read(job), created


@router.get("", response_model=Page[JobRead])
async def list_jobs(
    db: DbDep,
    status: StatusQuery | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[
        Literal["expand", "evaluate"] | None,
        Query(description="expand (jobs that add labels) or evaluate (evaluations); default: both"),
    ] = None,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Response:

    def work(session: Session, owner: str) -> tuple[str, str]:
        rows, next_cursor = jobs.list_jobs(
            session, owner, status=status, model=model, limit=limit, cursor=cursor, kind=kind
        )
        page = Page(items=[jobs.job_read(j) for j in rows], next_cursor=next_cursor)
        return owner, page.model_dump_json()

    key = (status, model, kind, limit, cursor)
    return await _polled(db, db.poll_cache.pages, key, work)


@router.get("/{job_id}", response_model=JobRead)
async def get_job(job_id: str, db: DbDep) -> Response:
    """The job, its progress and, once finished, its metrics. Repeated polls within
    GRAFT_POLL_CACHE_S (0.5 s) are answered from memory."""
    return await _polled(db, db.poll_cache.jobs, job_id, partial(_read_json, job_id=job_id))


def _read_json(session: Session, owner: str, *, job_id: str) -> tuple[str, str]:
    return owner, _read(session, owner, job_id).model_dump_json()


async def _polled(
    db: Db, window: Window, key: Hashable, work: Callable[[Session, str], tuple[str, str]]
) -> Response:
    """A polled read: from the poll cache when the key's owner is known and the answer is
    fresh, else from the database (once, for every request asking at the same moment)."""
    owner = await db.known_owner()
    body = await window.through(key, owner, lambda: db(work))
    return Response(body, media_type="application/json")


def _read(session: Session, owner: str, job_id: str) -> JobRead:
    return jobs.job_read(jobs.get_job(session, owner, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead)
async def cancel_job(job_id: str, db: DbDep) -> Response:
    cancelled = await db(
        lambda session, owner: jobs.job_read(jobs.cancel_job(session, owner, job_id))
    )
    db.poll_cache.changed(job_id)
    return json_response(cancelled, 202)


def _finished(session: Session, owner: str, job_id: str) -> JobRead:
    job = _read(session, owner, job_id)
    if job.status != "succeeded" or not job.metrics:
        raise Conflict(f"job {job_id} is {job.status}; reports exist for succeeded jobs")
    return job


@router.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the report"}},
)
async def job_report(job_id: str, db: DbDep) -> HTMLResponse:
    """A self-contained HTML page: old classes before/after, new classes, confusion matrix,
    training curve."""
    job = await db(lambda session, owner: _finished(session, owner, job_id))
    return HTMLResponse(await run_in_threadpool(reports.render_html, job))


@router.get(
    "/{job_id}/report.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the charts"}},
)
async def job_report_png(job_id: str, db: DbDep) -> Response:
    """The report's charts as a PNG."""
    job = await db(lambda session, owner: _finished(session, owner, job_id))
    return Response(await run_in_threadpool(reports.render_png, job), media_type="image/png")


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(job_id: str, request: Request, db: DbDep) -> StreamingResponse:
    """Server-sent events: ``progress`` while the job changes, ``status`` when its status
    changes, a ``: keep-alive`` comment every 15 s of silence; the stream ends after the final
    status."""
    # 404 before the stream starts; many streams opening at once share one read
    first = await _polled(db, db.poll_cache.jobs, job_id, partial(_read_json, job_id=job_id))
    return StreamingResponse(
        request.app.state.job_watch.events(JobRead.model_validate_json(first.body)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
