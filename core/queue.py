"""Ringing the broker's doorbell: only a job id travels, never the job itself.

A message carries the job id as its task id, so the sweep can read which queued jobs the
broker still holds a message for (``waiting_in_broker``) and ring again for exactly the others:
those submitted while the broker was down, and those a broker lost (a Redis restarted without
persistence, a flushed database).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer

from core.settings import Settings

log = logging.getLogger(__name__)
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


# Set when a message could not be sent: the sweeper checks the broker every second until it
# has sent what is missing (app.sweeper).
publish_failed = threading.Event()
# kombu's Redis transport keeps one list per priority step: "graft", "graft\x06\x163", ...
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_UNACKED = "unacked"


def publish_jobs(settings: Settings, job_ids: list[str]) -> int:
    """Send each id; a failure is logged, not raised: the job is safe in the database and the
    sweep sends it again once the broker answers. Stops at the first failure (the broker is
    down: each further try would only wait out its own timeout). Returns how many were sent."""
    sent = 0
    for job_id in job_ids:
        try:
            celery_for(settings).send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)
            sent += 1
        except Exception as exc:  # the broker is down; the sweep will retry
            log.warning(
                "could not publish %d job(s) (%s); the sweep sends them when the broker is back",
                len(job_ids) - sent,
                exc,
            )
            publish_failed.set()
            break
    return sent


def waiting_in_broker(settings: Settings) -> set[str] | None:
    """The ids of the jobs the broker holds a message for (waiting, or delivered and not yet
    acknowledged); None where the transport cannot be read. Raises when the broker is down."""
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        return _redis_ids(settings)
    if url.startswith("filesystem"):
        return _folder_ids(settings.queue_dir)
    return None


def _task_id(message: bytes | str) -> str | None:
    try:
        return json.loads(message)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None


def _redis_ids(settings: Settings) -> set[str]:
    with celery_for(settings).connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)  # fail fast while it is down
        client = conn.default_channel.client
        keys = [QUEUE] + [f"{QUEUE}{_REDIS_PRIORITY_SEP}{p}" for p in range(1, 10)]
        pipe = client.pipeline()
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(_REDIS_UNACKED)
        *queued, unacked = pipe.execute()
    ids = {_task_id(m) for messages in queued for m in messages}
    for entry in unacked:  # [message, exchange, routing key]
        try:
            ids.add(_task_id(json.dumps(json.loads(entry)[0])))
        except (ValueError, IndexError, TypeError):
            continue
    ids.discard(None)
    return ids  # type: ignore[return-value]


def _folder_ids(folder: Path) -> set[str]:
    ids = set()
    for path in folder.glob(f"*.{QUEUE}.msg"):
        try:
            ids.add(_task_id(path.read_bytes()))
        except OSError:  # taken by a worker meanwhile
            continue
    ids.discard(None)
    return ids  # type: ignore[return-value]


def broker_reachable(settings: Settings) -> bool:
    try:
        with celery_for(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
