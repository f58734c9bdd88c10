"""Logging: plain text for people, JSON lines for machines, each line carrying its job id."""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from core.settings import Settings

current_job: ContextVar[str | None] = ContextVar("current_job", default=None)


class JobContext(logging.Filter):
    """Stamps every record with the id of the job being run (or None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job.get()
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "job_id", None):
            entry["job_id"] = record.job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Lines libraries log at every start that tell an operator nothing (Graft logs where it serves,
# what it uses and when its worker is ready instead): (logger, start of the message).
NOISE = (
    ("alembic.runtime.migration", "Context impl "),
    ("alembic.runtime.migration", "Will assume "),
    ("kombu.connection", "No hostname was supplied"),
    ("uvicorn.error", "Started server process"),
    ("uvicorn.error", "Waiting for application "),
    ("uvicorn.error", "Application startup complete"),
    ("uvicorn.error", "Application shutdown complete"),
    ("uvicorn.error", "Finished server process"),
    ("celery.worker.consumer.connection", "Connected to "),
    ("celery.apps.worker", "%s ready."),
)


class StartupNoise(logging.Filter):
    """Drops the NOISE lines (all of them are shown at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(
            record.name == name and str(record.msg).startswith(start) for name, start in NOISE
        )


def redact(url: str) -> str:
    """A URL fit for a log: its password, and query values that look secret, replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urlencode(
        [
            (k, "***" if any(w in k.lower() for w in ("pass", "secret", "token", "key")) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    if netloc == parts.netloc and query == parts.query:
        return url  # as it was (urlunsplit would drop the empty host of sqlite:////path)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe(settings: Settings) -> str:
    """What a process works with, for its first log line: database, broker, storage."""
    broker = settings.resolved_broker_url
    queue = (
        f"a filesystem queue in {settings.queue_dir}"
        if broker.startswith("filesystem")
        else redact(broker)
    )
    return (
        f"database {redact(settings.resolved_database_url)}, broker {queue}, "
        f"storage {redact(settings.resolved_storage_url)}"
    )


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """One handler on the root logger for everything the process logs: Graft, uvicorn, Celery,
    and Python warnings (so that a JSON log holds nothing but JSON lines). Below DEBUG, the
    libraries' start-up chatter (NOISE) is left out."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContext())
    if logging.getLevelName(level.upper()) != logging.DEBUG:
        handler.addFilter(StartupNoise())
        # transformers warns through its own handler of what a user cannot act on (a config's
        # ``loss_type=None``, say): only its errors, unless the log is at DEBUG.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        # Containers commonly run as root; the worker accepts JSON only, so this is not a risk.
        warnings.filterwarnings(
            "ignore", message="You're running the worker with superuser privileges"
        )
    handler.setFormatter(
        JSONFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # seven lines a start
