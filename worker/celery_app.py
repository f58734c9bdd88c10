"""Celery configuration for hours-long GPU jobs. The broker carries job ids; the database
carries the jobs.

    celery -A worker.celery_app:app worker      # what `graft worker` runs

Either way a worker runs one job at a time in its own process (the solo pool): a worker is one
GPU; scale by running more workers. Logs go through Graft's handler (GRAFT_LOG_FORMAT).
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

from core.logs import configure_logging, describe, redact
from core.queue import QUEUE, celery_for
from core.settings import SERVE_PARENT, get_settings

log = logging.getLogger("graft.worker")


@signals.setup_logging.connect
def _graft_logging(**_: object) -> None:
    """A starting worker logs as the API does (text or JSON lines with the job id), instead of
    Celery's own format."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@signals.celeryd_init.connect
def _no_banner(instance: object = None, **_: object) -> None:
    """Celery's start-up banner (its configuration, in ASCII art) only at DEBUG: the worker
    says what it uses in one line when it is ready."""
    if get_settings().log_level.upper() != "DEBUG" and instance is not None:
        instance.quiet = True  # type: ignore[attr-defined]


@signals.worker_ready.connect
def _ready(sender: object = None, **_: object) -> None:
    settings = get_settings()
    broker = settings.resolved_broker_url
    where = (
        describe(settings)
        if not os.environ.get(SERVE_PARENT)  # `graft serve` says it all for both
        else "broker "
        + ("a filesystem queue" if broker.startswith("filesystem") else redact(broker))
    )
    log.info(
        "worker %s ready: one job at a time from queue %s; %s",
        getattr(sender, "hostname", ""),
        QUEUE,
        where,
    )


def __getattr__(name: str) -> Celery:
    if name == "app":  # for `celery -A worker.celery_app:app` (worker, Flower, inspection)
        _graft_logging()  # before Celery's start-up checks warn about anything
        return celery_for(get_settings())
    raise AttributeError(name)
