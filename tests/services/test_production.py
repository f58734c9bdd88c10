"""The production configuration (PostgreSQL, Redis broker, separate API and worker processes)
on the real services, with the same code as the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient

from app.main import create_app
from core.migrate import MIGRATIONS, db_upgrade
from core.settings import Settings
from devkit.digits import digits_archive, register_digits

pytestmark = pytest.mark.services


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def test_migrations_reach_head_without_drift_on_postgres_and_sqlite(postgres_url, tmp_path):
    for url in (postgres_url, f"sqlite:///{tmp_path / 'drift.db'}"):
        command.upgrade(alembic_config(url), "head")
        command.check(alembic_config(url))  # raises if the models and migrations disagree
        command.downgrade(alembic_config(url), "base")
        command.upgrade(alembic_config(url), "head")


def test_a_job_runs_on_a_separate_worker_through_redis_and_postgres(
    postgres_url, redis_url, tmp_path, base_weights, digit_splits
):
    env = {
        "GRAFT_DATABASE_URL": postgres_url,
        "GRAFT_BROKER_URL": redis_url,
        "GRAFT_DATA_DIR": str(tmp_path),
        "GRAFT_LOG_LEVEL": "WARNING",
    }
    settings = Settings(
        database_url=postgres_url, broker_url=redis_url, data_dir=tmp_path, sweep_interval_s=0
    )
    db_upgrade(settings)
    worker = subprocess.Popen(
        [sys.executable, "-m", "graft.cli", "worker"], env={**os.environ, **env}
    )
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"] == {
                "database": True,
                "broker": True,
                "disk": True,
            }
            assert register_digits(client, base_weights).status_code == 201
            archive = digits_archive(digit_splits[1], old_per_class=20, new_shots=10)
            dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
            job = client.post(
                "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}
            ).json()
            deadline = time.monotonic() + 120
            while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] in (
                "queued",
                "running",
            ):
                assert time.monotonic() < deadline, job
                time.sleep(0.3)
            assert job["status"] == "succeeded", job["error"]
            assert client.get("/v1/models/digits").json()["versions"][-1]["version"] == 2
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_readyz_reports_an_unreachable_broker(postgres_url, tmp_path):
    settings = Settings(
        database_url=postgres_url,
        broker_url="redis://127.0.0.1:1/0",
        data_dir=tmp_path,
        sweep_interval_s=0,
    )
    db_upgrade(settings)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "broker": False, "disk": True}
