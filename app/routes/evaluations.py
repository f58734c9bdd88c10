"""Evaluations: versions of a model scored on a dataset and compared (a job of kind evaluate)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session

from app import evaluation_report, evaluations, jobs
from app.deps import CursorQuery, DbDep, LimitQuery, SettingsDep
from app.routes import json_response, problems
from app.schemas import EvaluationCreate, EvaluationRead, Page
from core.errors import Conflict
from core.queue import publish_jobs

router = APIRouter(
    prefix="/v1/evaluations",
    tags=["evaluations"],
    responses=problems(400, 401, 404, 409, 413, 422, 503),
)


@router.post("", status_code=202, response_model=EvaluationRead)
async def submit_evaluation(
    body: EvaluationCreate,
    db: DbDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Queue an evaluation: every listed version scores every image of the dataset whose label
    it knows, and every pair of versions is compared on the images both can score. Follow it
    with GET /v1/evaluations/{id} (or its events); it runs on the same workers as jobs."""

    def work(session: Session, owner: str) -> tuple[EvaluationRead, bool]:
        job, created = evaluations.create_evaluation(
            session, settings, owner, body, idempotency_key
        )
        return evaluations.evaluation_read(job), created

    read, created = await db(work)
    if created:  # the row is committed before the doorbell rings
        await run_in_threadpool(publish_jobs, settings, [read.id])
        db.poll_cache.changed(read.id)
    return json_response(read, 202, {"Location": f"/v1/evaluations/{read.id}"})


@router.get("", response_model=Page[EvaluationRead])
async def list_evaluations(
    db: DbDep,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
) -> Page[EvaluationRead]:
    def work(session: Session, owner: str) -> Page[EvaluationRead]:
        rows, next_cursor = jobs.list_jobs(
            session,
            owner,
            status=status,
            model=model,
            limit=limit,
            cursor=cursor,
            kind="evaluate",
        )
        return Page(items=[evaluations.evaluation_read(j) for j in rows], next_cursor=next_cursor)

    return await db(work)


def _read(session: Session, owner: str, evaluation_id: str) -> EvaluationRead:
    return evaluations.evaluation_read(evaluations.get_evaluation(session, owner, evaluation_id))


@router.get("/{evaluation_id}", response_model=EvaluationRead)
async def get_evaluation(evaluation_id: str, db: DbDep) -> EvaluationRead:
    """The evaluation, its progress and, once it has succeeded, its figures (``result``)."""
    return await db(lambda session, owner: _read(session, owner, evaluation_id))


@router.post("/{evaluation_id}/cancel", status_code=202, response_model=EvaluationRead)
async def cancel_evaluation(evaluation_id: str, db: DbDep) -> Response:
    def work(session: Session, owner: str) -> EvaluationRead:
        evaluations.get_evaluation(session, owner, evaluation_id)
        return evaluations.evaluation_read(jobs.cancel_job(session, owner, evaluation_id))

    cancelled = await db(work)
    db.poll_cache.changed(evaluation_id)
    return json_response(cancelled, 202)


@router.get(
    "/{evaluation_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def evaluation_events(evaluation_id: str, request: Request, db: DbDep) -> StreamingResponse:
    """Server-sent events, as for jobs (each carries the evaluation's job record, kind
    ``evaluate``); the stream ends after the final status."""
    first = await db(
        lambda session, owner: jobs.job_read(
            evaluations.get_evaluation(session, owner, evaluation_id)
        )
    )
    return StreamingResponse(
        request.app.state.job_watch.events(first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _finished(session: Session, owner: str, evaluation_id: str) -> EvaluationRead:
    read = _read(session, owner, evaluation_id)
    if read.status != "succeeded":
        raise Conflict(
            f"evaluation {evaluation_id} is {read.status}; reports exist for succeeded ones"
        )
    return read


@router.get(
    "/{evaluation_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the report"}},
)
async def evaluation_report_html(evaluation_id: str, db: DbDep) -> HTMLResponse:
    """A self-contained HTML page with the versions side by side."""
    read = await db(lambda session, owner: _finished(session, owner, evaluation_id))
    return HTMLResponse(await run_in_threadpool(evaluation_report.render_html, read))


@router.get(
    "/{evaluation_id}/report.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the charts"}},
)
async def evaluation_report_png(evaluation_id: str, db: DbDep) -> Response:
    """Per-label recall and accuracy of every version, with their intervals, as a PNG."""
    read = await db(lambda session, owner: _finished(session, owner, evaluation_id))
    png = await run_in_threadpool(evaluation_report.render_png, read)
    return Response(png, media_type="image/png")
