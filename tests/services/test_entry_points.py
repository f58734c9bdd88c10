"""The production entry points as an operator starts them, configured only by GRAFT_*: `graft api`
and `celery -A worker.celery_app:app worker` on PostgreSQL and Redis, logging JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devkit.digits import digits_archive, register_digits
from tests.support.processes import start_api

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[2]


def json_lines(path: Path) -> list[dict]:
    """Every line of a log file, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_celery_worker_entry_point_runs_one_job_at_a_time_and_logs_json_with_the_job_id(
    tmp_path, postgres_url, redis_url, base_weights, digit_splits
):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    env = {
        "GRAFT_DATABASE_URL": postgres_url,
        "GRAFT_BROKER_URL": redis_url,
        "GRAFT_LOG_FORMAT": "json",
        "GRAFT_POLL_CACHE_S": "0",
    }
    api, port = start_api(data_dir, **env)
    worker = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert register_digits(client, base_weights).status_code == 201
            archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=8)
            dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
            jobs = [
                client.post(
                    "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}
                ).json()["id"]
                for _ in range(2)
            ]
            stderr = (data_dir / "worker.err").open("w")
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker"],
                env={**os.environ, "GRAFT_DATA_DIR": str(data_dir), **env},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,  # Celery's banner
                stderr=stderr,
            )
            deadline = time.monotonic() + 600  # a safety net: two small jobs on a busy CPU
            running_at_once = 0
            while True:
                states = [client.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]
                running_at_once = max(running_at_once, states.count("running"))
                if all(s in ("succeeded", "failed") for s in states):
                    break
                assert time.monotonic() < deadline and worker.poll() is None, states
                time.sleep(0.1)
            assert states == ["succeeded", "succeeded"]
            assert running_at_once == 1
            assert children(worker.pid) == []  # the solo pool: no forked pool processes
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        api.terminate()
        api.wait(timeout=60)

    worker_log = json_lines(data_dir / "worker.err")
    for job_id in jobs:
        about = [line["message"] for line in worker_log if line.get("job_id") == job_id]
        assert any("succeeded" in message for message in about), about
    assert any(line["logger"].startswith("celery") for line in worker_log)
    api_log = json_lines(data_dir / "api.log")
    assert any(line["logger"].startswith("uvicorn") for line in api_log)
