"""Crash tests of the production configuration: real PostgreSQL, real Redis, real worker
processes killed, paused, flushed and restarted. A job is never lost, run twice, or half-written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.jobs import create_job
from app.main import Sweeper, create_app
from app.models import Job
from app.schemas import JobCreate
from app.server import db_upgrade
from app.settings import Settings
from tests.conftest import digits_archive, register_digits

pytestmark = pytest.mark.services
FINAL = {"succeeded", "failed", "cancelled"}
SLOW = {"augmentation": {"views": 48, "rotation_degrees": 5}}  # long enough to interrupt


class Cluster:
    """One database, one broker, one shared data folder, and worker processes on demand."""

    def __init__(self, settings: Settings, env: dict[str, str], logs: Path) -> None:
        self.settings, self.env, self.logs = settings, env, logs
        self.workers: list[subprocess.Popen] = []
        self.client = TestClient(create_app(settings))
        self.client.__enter__()
        self.sweeper = Sweeper(settings)

    def worker(self) -> subprocess.Popen:
        log = (self.logs / f"worker{len(self.workers)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "graft.cli", "worker"],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(process)
        return process

    def submit(self, config: dict | None = None) -> str:
        response = self.client.post(
            "/v1/jobs",
            json={
                "model": "digits",
                "base_version": 1,
                "dataset_id": self.dataset_id,
                "config": {"min_old_accuracy_retention": 0, **(config or {})},
            },
        )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(
        self, job_ids: list[str], until: set[str], timeout: float = 120, sweep: bool = True
    ) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = [self.job(j) for j in job_ids]
            if all(j["status"] in until for j in jobs):
                return jobs
            assert time.monotonic() < deadline, [(j["id"], j["status"]) for j in jobs]
            if sweep:
                self.sweeper.run_once()
            time.sleep(0.3)

    def wait_running(self, job_id: str) -> None:
        self.wait([job_id], {"running"}, timeout=60, sweep=False)
        while self.job(job_id)["progress"]["stage"] not in ("extracting", "training"):
            time.sleep(0.05)

    def worker_pid(self, job_id: str) -> int:
        with session_scope(self.settings.resolved_database_url) as session:
            return int(session.scalar(select(Job.worker).where(Job.id == job_id)).split("/")[1])

    def versions(self) -> list[int]:
        return [v["version"] for v in self.client.get("/v1/models/digits").json()["versions"]]

    def stored_files(self) -> list[Path]:
        """Every stored file but the reference images, which versions share by content."""
        return sorted(
            p
            for p in (self.settings.data_dir / "artifacts").rglob("*")
            if p.is_file() and p.parent.name != "reference"
        )

    def reference_images(self) -> int:
        return sum(1 for _ in (self.settings.data_dir / "artifacts").rglob("reference/*"))

    def close(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.client.__exit__(None, None, None)


@pytest.fixture()
def cluster(postgres_url, redis_url, tmp_path, base_weights, digit_splits):
    env = {
        "GRAFT_DATABASE_URL": postgres_url,
        "GRAFT_BROKER_URL": redis_url,
        "GRAFT_DATA_DIR": str(tmp_path / "shared"),
        "GRAFT_JOB_LEASE_S": "3",
        "GRAFT_LOG_LEVEL": "INFO",
    }
    settings = Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path / "shared",
        job_lease_s=3,
        requeue_after_s=1,
        sweep_interval_s=0,
    )
    db_upgrade(settings)
    c = Cluster(settings, env, tmp_path)
    assert register_digits(c.client, base_weights).status_code == 201
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=10)
    c.dataset_id = c.client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()["id"]
    yield c
    c.close()


def test_a_worker_killed_mid_training_is_replaced_and_the_job_runs_once(cluster):
    first = cluster.worker()
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    first.send_signal(signal.SIGKILL)
    cluster.worker()
    (job,) = cluster.wait([job_id], FINAL)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert cluster.versions() == [1, 2]
    assert list(cluster.settings.tmp_dir.iterdir()) == []
    # dataset, v1, v2 safetensors + onnx + reference manifest, the feature cache
    assert len(cluster.stored_files()) == 6
    assert cluster.reference_images() == 9 * 10 + 10  # every image v2 learnt from, once


def test_a_worker_that_loses_its_lease_cannot_write(cluster):
    workers = {w.pid: w for w in (cluster.worker(), cluster.worker())}
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    paused = workers[cluster.worker_pid(job_id)]
    paused.send_signal(signal.SIGSTOP)  # a frozen process: a GC pause, a partition, a VM stall
    try:
        (job,) = cluster.wait([job_id], FINAL, timeout=180)
    finally:
        paused.send_signal(signal.SIGCONT)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert cluster.worker_pid(job_id) != paused.pid
    time.sleep(4)  # the paused worker wakes up, finds its lease gone, and must write nothing
    assert cluster.job(job_id)["attempt"] == 2
    assert cluster.versions() == [1, 2]
    assert len(cluster.stored_files()) == 6  # nothing of the paused attempt's
    assert cluster.reference_images() == 100
    assert paused.poll() is None  # and it lives on to take other jobs


def test_jobs_survive_a_broker_that_forgets_everything(cluster, redis_url):
    job_ids = [cluster.submit({"epochs": 3}) for _ in range(3)]
    redis.Redis.from_url(redis_url).flushdb()  # every queued message is gone
    cluster.worker()
    jobs = cluster.wait(job_ids, FINAL)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    assert cluster.versions() == [1, 2, 3, 4]


def test_a_job_committed_but_never_published_is_found_by_the_sweep(cluster):
    cluster.worker()
    with session_scope(cluster.settings.resolved_database_url) as session:  # the API died here
        job, _ = create_job(
            session,
            cluster.settings,
            "local",
            JobCreate(model="digits", dataset_id=cluster.dataset_id),
        )
        job_id = job.id
    time.sleep(3)
    assert cluster.job(job_id)["status"] == "queued"
    (job,) = cluster.wait([job_id], FINAL)
    assert job["status"] == "succeeded" and job["attempt"] == 1


def test_two_workers_run_ten_jobs_exactly_once_each(cluster):
    cluster.worker(), cluster.worker()
    job_ids = [cluster.submit({"epochs": 2}) for _ in range(10)]
    jobs = cluster.wait(job_ids, FINAL, timeout=240)  # the sweep re-sends: duplicates abound
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert all(j["attempt"] == 1 for j in jobs)
    assert cluster.versions() == list(range(1, 12))
    assert sorted(j["result"]["version"] for j in jobs) == list(range(2, 12))


def test_sigterm_hands_the_running_job_back(cluster):
    first = cluster.worker()
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    handed_back = cluster.job(job_id)
    assert handed_back["status"] == "queued", handed_back
    assert "shut down" in handed_back["progress"]["message"]
    cluster.worker()
    (job,) = cluster.wait([job_id], FINAL)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert cluster.versions() == [1, 2]


def test_cancel_stops_a_running_job_within_seconds(cluster):
    cluster.worker()
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    asked = time.monotonic()
    assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    (job,) = cluster.wait([job_id], FINAL, timeout=30, sweep=False)
    assert job["status"] == "cancelled" and time.monotonic() - asked < 10
    assert cluster.versions() == [1]
    assert len(cluster.stored_files()) == 2


def test_the_api_rides_out_a_postgresql_restart(cluster):
    cluster_name = (
        sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    )
    if cluster_name is None or shutil.which("pg_ctlcluster") is None:
        if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
            pytest.fail("pg_ctlcluster is needed to restart PostgreSQL")
        pytest.skip("no local PostgreSQL cluster to restart")
    statuses: list[tuple[float, int]] = []
    restarted = threading.Event()

    def restart() -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", cluster_name, "main", "restart"],
            check=True,
            capture_output=True,
        )
        restarted.set()

    threading.Thread(target=restart).start()
    until = None
    while until is None or time.monotonic() < until:
        response = cluster.client.get("/v1/models/digits")
        statuses.append((time.monotonic(), response.status_code))
        if response.status_code != 200:
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
        if restarted.is_set() and until is None:
            until = time.monotonic() + 3
        time.sleep(0.05)
    after = [code for t, code in statuses if t > until - 2]
    assert after and set(after) == {200}
