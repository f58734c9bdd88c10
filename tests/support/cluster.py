"""A production-shaped Graft for crash tests: one PostgreSQL database, one Redis, one shared
data folder, the API in-process, and real worker processes started on demand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from app.sweeper import Sweeper
from core.db import session_scope
from core.models import Job
from core.settings import Settings
from devkit.faults import Pollers

FINAL = {"succeeded", "failed", "cancelled"}
# long enough to interrupt: about as long on the clusters' resnet10t as 24 views on a resnet18
SLOW = {"augmentation": {"views": 48, "rotation_degrees": 5}}


class Cluster:
    """One database, one broker, one shared data folder, and worker processes on demand."""

    def __init__(self, settings: Settings, env: dict[str, str], logs: Path) -> None:
        self.settings, self.env, self.logs = settings, env, logs
        self.workers: list[subprocess.Popen] = []
        self.client = TestClient(create_app(settings))
        self.client.__enter__()
        self.sweeper = Sweeper(settings)
        self.pollers = Pollers(self.client.get)  # a user polling through every fault

    def worker(self, **env: str) -> subprocess.Popen:
        """A `graft worker` process; ``env``: GRAFT_* settings of its own. Its torch computes on
        one thread: these tests run two workers, the API and a sandbox at once on a CI machine
        of two cores, where workers of two spinning threads each ran jobs 2.7 times slower."""
        log = (self.logs / f"worker{len(self.workers)}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "graft.cli", "worker"],
            env={**os.environ, "OMP_NUM_THREADS": "1", **self.env, **env},
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
                "config": {"gate": {"min_retention": 0}, **(config or {})},
            },
        )
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait(
        self, job_ids: list[str], until: set[str], timeout: float = 600, sweep: bool = True
    ) -> list[dict]:
        """Poll until every job is in ``until``; ``timeout`` is a safety net against a hang,
        many times what the jobs take on a busy machine, not a measure of speed."""
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
        self.wait([job_id], {"running"}, timeout=300, sweep=False)
        deadline = time.monotonic() + 300
        while self.job(job_id)["progress"]["stage"] not in ("extracting", "training"):
            assert time.monotonic() < deadline
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

    def close(self) -> str:
        """Stop everything; what the pollers were answered meanwhile."""
        polled = self.pollers.stop()
        for process in self.workers:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.client.__exit__(None, None, None)
        return polled
