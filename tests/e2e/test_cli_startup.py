"""What `graft serve` and `graft api` print when they start, at the default log level: where they
serve, what they use (without secrets), that the worker is ready, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from devkit.net import free_port
from tests.support.processes import start_api

pytestmark = pytest.mark.slow
NOISE = (
    "Context impl",
    "Will assume non-transactional DDL",
    "No hostname was supplied",
    "superuser privileges",
    "[config]",  # Celery's banner
    "Started server process",
    "Waiting for application startup",
)


def test_graft_serve_says_where_it_serves_and_that_its_worker_is_ready_and_no_more(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "GRAFT_DATA_DIR": str(tmp_path / "var"),
        "GRAFT_PORT": str(port),
        "GRAFT_LOG_LEVEL": "INFO",
        "GRAFT_LOG_FORMAT": "text",
    }
    log = tmp_path / "serve.log"
    with log.open("w") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "graft.cli", "serve"], env=env, stdout=f, stderr=f
        )
    try:
        deadline = time.monotonic() + 180  # a safety net against a hang, not a measure of speed
        while "ready" not in log.read_text() or not _ready(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    said = log.read_text()
    for noise in NOISE:
        assert noise not in said, said
    assert f"http://127.0.0.1:{port}" in said
    data = (tmp_path / "var").resolve()
    assert f"database sqlite:///{data / 'graft.db'}" in said
    assert f"storage {(data / 'artifacts').as_uri()}" in said
    assert "worker graft-" in said and "ready" in said
    assert len(said.splitlines()) < 20, said


def test_graft_api_names_its_broker_without_its_password(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    process, port = start_api(
        data, GRAFT_LOG_LEVEL="INFO", GRAFT_BROKER_URL="redis://:hunter2@127.0.0.1:9/0"
    )
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    said = (data / "api.log").read_text()
    assert "broker redis://:***@127.0.0.1:9/0" in said and "hunter2" not in said
    assert f"http://127.0.0.1:{port}" in said
    for noise in NOISE:
        assert noise not in said, said


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_graft_serve_on_a_taken_port_says_how_to_pick_another_and_starts_nothing(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "GRAFT_DATA_DIR": str(tmp_path / "var"), "GRAFT_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, "-m", "graft.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port} is taken" in done.stderr and "GRAFT_PORT" in done.stderr
    assert "GRAFT_DATA_DIR" in done.stderr
    assert not (tmp_path / "var").exists()  # no worker, no database: nothing started
