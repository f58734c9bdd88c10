"""The FastAPI application: routers, problem+json errors, and the lifetimes of the sweeper
and the importer."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.deps import Database
from app.importer import Importer
from app.inputs import ControlCharacters
from app.loopwatch import LoopWatch
from app.observability import Metrics, MetricsMiddleware
from app.pollcache import PollCache
from app.predict import PredictorCache
from app.routes import (
    PROBLEM_MEDIA_TYPE,
    datasets,
    evaluations,
    jobs,
    models,
    ops,
    problem_media_types,
)
from app.schemas import NAME_PATTERN, NAME_RULE
from app.sweeper import Sweeper
from app.uploads import BodySizeLimit
from app.watch import JobWatch
from core.errors import InsufficientStorage, ServiceError, Unavailable
from core.settings import Settings, get_settings
from engine.errors import DiskFull, OutOfMemory, resource_error

log = logging.getLogger(__name__)
PROBLEM = PROBLEM_MEDIA_TYPE


def problem(
    status: int, title: str, detail: str, type_: str = "about:blank", errors: list | None = None
) -> JSONResponse:
    body = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail,
        "errors": errors or [],
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ".".join(map(str, loc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        response = problem(exc.status, exc.title, exc.detail, exc.type_, exc.errors)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e["loc"]), "message": _message(e)} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
        return problem(
            422,
            "Unprocessable content",
            detail or "invalid request",
            "https://graft.dev/problems/invalid",
            errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            title = HTTPStatus(exc.status_code).phrase
        except ValueError:
            title = "Error"
        response = problem(exc.status_code, title, str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    def out_of_resources(exc: Exception) -> JSONResponse | None:
        """507 for a full disk, 503 for memory the server could not get; None otherwise."""
        error = resource_error(exc)
        if isinstance(error, DiskFull):
            log.error("the disk is full: %s", exc)
            detail = "the server's disk is full; nothing was stored. Retry once space is freed"
            return problem(507, InsufficientStorage.title, detail, InsufficientStorage.type_)
        if isinstance(error, OutOfMemory):
            log.error("out of memory: %s", exc)
            detail = "the server ran out of memory handling this request; nothing was stored"
            return problem(503, Unavailable.title, detail, Unavailable.type_)
        return None

    @app.exception_handler(DBAPIError)
    async def database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if full := out_of_resources(exc):  # SQLite: "database or disk is full"
            return full
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            log.warning("database unreachable: %s", exc.orig)
            response = problem(
                503,
                Unavailable.title,
                "the database is unreachable; retry shortly",
                Unavailable.type_,
            )
            response.headers["Retry-After"] = "2"
            return response
        log.exception("database error", exc_info=exc)
        return problem(500, "Internal server error", "an unexpected error occurred")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        if full := out_of_resources(exc):
            return full
        log.exception("unhandled error", exc_info=exc)
        return problem(500, "Internal server error", "an unexpected error occurred")


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = problem_media_types(
                get_openapi(
                    title=app.title, version=app.version, summary=app.summary, routes=app.routes
                )
            )
        return app.openapi_schema

    app.openapi = openapi


STATIC = Path(__file__).resolve().parent / "static"


def install_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from files the package ships (no CDN, so it works offline)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{root}/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/swagger-ui/favicon-32x32.png",
        )


def _message(error: dict) -> str:
    """A validation error's message, in words where pydantic would show a regex."""
    pattern = (error.get("ctx") or {}).get("pattern")
    if error.get("type") == "string_pattern_mismatch" and pattern == NAME_PATTERN:
        return NAME_RULE
    return str(error["msg"])


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = Sweeper(settings)
        if settings.sweep_interval_s > 0:
            sweeper.start()
        if settings.import_bucket_names:  # datasets registered by reference are copied in
            app.state.importer = Importer(settings)
            app.state.importer.start()
        # What was imported to get here (torch among it) lives as long as the process: keep
        # the collector from walking it again, which paused the API for ~250 ms at a time.
        gc.collect()
        gc.freeze()
        app.state.loop_watch = LoopWatch(app.state.metrics.loop_lag)
        app.state.loop_watch.start()
        yield
        app.state.loop_watch.stop()
        await app.state.job_watch.close()
        if settings.sweep_interval_s > 0:
            sweeper.stop()
        if importer := getattr(app.state, "importer", None):
            importer.stop()

    app = FastAPI(
        title="Graft",
        version=__version__,
        summary="Teach a trained image classifier new labels, and keep the old ones.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, from the package
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.database = Database(settings.resolved_database_url)
    app.state.job_watch = JobWatch(app.state.database)
    app.state.poll_cache = PollCache(settings.poll_cache_s)
    app.state.predictors = PredictorCache()
    app.state.metrics = Metrics(settings.resolved_database_url)
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    for router in (models.router, datasets.router, jobs.router, evaluations.router, ops.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + 1024 * 1024)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(ControlCharacters)  # outermost: nothing runs on such a request
    return app
