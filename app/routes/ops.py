"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app import __version__
from app.deps import SettingsDep
from core.db import get_engine
from core.disk import has_room
from core.queue import broker_reachable

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    responses={
        200: {
            "content": {"application/json": {"example": {"status": "ok", "version": __version__}}}
        }
    },
)
async def healthz() -> dict:
    return {"status": "ok", "version": __version__}


def _database_reachable(url: str) -> bool:
    try:
        with get_engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


READY = {"status": "ready", "checks": {"database": True, "broker": True, "disk": True}}
NOT_READY = {"status": "unavailable", "checks": {"database": True, "broker": False, "disk": True}}


@router.get(
    "/readyz",
    responses={
        200: {"content": {"application/json": {"example": READY}}},
        503: {
            "description": "a dependency is unreachable",
            "content": {"application/json": {"example": NOT_READY}},
        },
    },
)
async def readyz(settings: SettingsDep) -> JSONResponse:
    checks = {
        "database": await run_in_threadpool(_database_reachable, settings.resolved_database_url),
        "broker": await run_in_threadpool(broker_reachable, settings),
        "disk": has_room(settings),  # at least GRAFT_MIN_FREE_DISK_MB free under data_dir
    }
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'graft_jobs{status="queued"} 0.0\ngraft_queue_depth 0.0\n'
                }
            }
        }
    },
)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
