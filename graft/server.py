"""Running Graft: migrations, the API, a worker, and both together (what `graft serve` runs)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from core.migrate import db_upgrade
from core.settings import SERVE_PARENT, Settings
from engine.sandbox import hide_environment

log = logging.getLogger("graft")


def run_api(settings: Settings) -> None:
    import uvicorn

    hide_environment()  # a model's code in a sandboxed child cannot read its credentials
    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers go through Graft's handler (text or JSON)
        proxy_headers=True,
        # a stopping API finishes what is in flight, but does not wait forever on a slow upload
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def worker_argv(settings: Settings) -> list[str]:
    from core.queue import QUEUE

    # The pool (solo: one job, in the process itself) is in the Celery configuration, so that
    # `celery -A worker.celery_app:app worker` runs the same. Graft enforces time limits and
    # hand-back on SIGTERM itself.
    argv = [
        "worker",
        f"--loglevel={settings.log_level}",
        f"--queues={QUEUE}",
        f"--hostname=graft-{os.getpid()}@%h",
    ]
    if settings.log_format == "json":
        argv.insert(0, "--quiet")  # no start-up banner: a JSON log holds JSON lines only
    if settings.resolved_broker_url.startswith("filesystem"):
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def run_worker(settings: Settings) -> None:
    from worker.celery_app import celery_for

    hide_environment()
    parent = os.environ.get(SERVE_PARENT)
    if parent:
        _exit_when_orphaned(int(parent))
    celery_for(settings).worker_main(worker_argv(settings))


def _exit_when_orphaned(parent: int) -> None:
    """A worker started by `graft serve` stops (warmly) if `serve` dies without stopping it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        log.warning("graft serve is gone; the worker stops after its current job")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _exit_on(*signals: signal.Signals) -> None:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    for s in signals:
        signal.signal(s, handler)


def serve(settings: Settings) -> None:
    """Migrate, start a worker process, and serve the API; stopping one stops both."""
    hide_environment()
    db_upgrade(settings)
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; turning them into
    # SystemExit lets the `finally` below stop the worker.
    _exit_on(signal.SIGINT, signal.SIGTERM)
    worker = subprocess.Popen(
        [sys.executable, "-m", "graft.cli", "worker"],
        start_new_session=True,
        env={**os.environ, SERVE_PARENT: str(os.getpid())},
    )
    stopping = threading.Event()

    def watch_worker() -> None:
        code = worker.wait()
        if not stopping.is_set():
            log.error("the worker exited (code %s); stopping the server", code)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_worker, daemon=True).start()
    try:
        run_api(settings)
    finally:
        stopping.set()
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
