"""Celery configuration for hours-long GPU jobs. The broker carries job ids; the database
carries the jobs.

    celery -A worker.celery_app:app worker      # what `graft worker` runs

Either way a worker runs one job at a time in its own process (the solo pool): a worker is one
GPU; scale by running more workers. Logs go through Graft's handler (GRAFT_LOG_FORMAT).
"""

from __future__ import annotations

import functools
import logging
import os
from functools import lru_cache
from typing import Any

from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer

from app.logs import configure_logging, describe, redact
from app.settings import SERVE_PARENT, Settings, get_settings

log = logging.getLogger("graft.worker")
RUN_JOB_TASK = "graft.run_job"
QUEUE = "graft"
RECONNECT_S = 1.0  # how often a worker tries a broker it lost


class Consumer(CeleryConsumer):
    """Celery's consumer, trying a lost broker every second. Celery's own retries wait 2 s
    more each time (2, 4, 6 ... 30 s), so after a 40 s outage a worker came back up to 9 s
    after the broker did, with jobs waiting."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection,
            interval_start=RECONNECT_S,
            interval_step=0,
            interval_max=RECONNECT_S,
        )
        return super().ensure_connected(conn)


def create_celery(settings: Settings) -> Celery:
    app = Celery("graft", broker=settings.resolved_broker_url, include=["worker.tasks"])
    # Redis redelivers an unacknowledged job after this long; keep it beyond the hard limit so
    # a long job is not handed to a second worker while the first still holds it.
    visibility = settings.job_time_limit_s + settings.job_time_grace_s + 3600
    transport_options: dict = {"visibility_timeout": visibility}
    filesystem = settings.resolved_broker_url.startswith("filesystem")
    if filesystem:
        folder = str(settings.queue_dir)
        transport_options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.queue_dir / "control"),
            "store_processed": False,
        }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool="solo",
        worker_concurrency=1,
        task_default_queue=QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": QUEUE}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=not filesystem,
        worker_send_task_events=not filesystem,
        worker_hijack_root_logger=False,
        worker_consumer=f"{__name__}:Consumer",
    )
    return app


@lru_cache
def celery_for(settings: Settings) -> Celery:
    if settings.resolved_broker_url.startswith("filesystem"):
        settings.ensure_dirs()
        (settings.queue_dir / "control").mkdir(exist_ok=True)
    return create_celery(settings)


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
