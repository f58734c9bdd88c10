"""Settings that the README documents act as it says: the heartbeat's interval, its bound by
the lease, how often the janitor runs, how many attempts a job gets, how long a final write is
retried, how many old-label images retention needs, and how a job picks its reference set."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from app.main import create_app
from app.sweeper import Sweeper, sweep
from core.db import session_scope, utcnow
from core.models import Job, ModelVersion
from core.reference_store import read_manifest
from core.settings import Settings
from core.storage import open_storage
from devkit.digits import digits_archive, register_digits
from devkit.net import free_port
from worker import pipeline
from worker.lifecycle import Heartbeat, with_retries


@pytest.fixture()
def job_id(client, model, digit_splits):
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    return client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()[
        "id"
    ]


def test_the_heartbeat_renews_the_lease_every_graft_heartbeat_s(settings, job_id):
    fast = settings.model_copy(update={"heartbeat_s": 0.05})
    attempt = pipeline.claim_job(fast, job_id)
    leases = set()
    with Heartbeat(fast, job_id, attempt), session_scope(fast.resolved_database_url) as s:
        deadline = time.monotonic() + 20  # a safety net: at 1 s a beat it would take 6 s
        while len(leases) < 6:
            assert time.monotonic() < deadline, leases
            s.expire_all()
            leases.add(s.scalar(select(Job.lease_expires_at).where(Job.id == job_id)))
            time.sleep(0.01)


def test_a_heartbeat_slower_than_half_the_lease_is_refused_at_start():
    with pytest.raises(ValidationError, match="must be at most half of GRAFT_JOB_LEASE_S"):
        Settings(heartbeat_s=90, job_lease_s=120)


def test_the_janitor_runs_every_graft_janitor_interval_s(settings):
    leftover = settings.tmp_dir / "dataset-killed"
    (leftover / "images").mkdir(parents=True)
    sweeper = Sweeper(settings.model_copy(update={"orphan_grace_s": 0, "janitor_interval_s": 1}))
    sweeper.start()
    try:
        deadline = time.monotonic() + 30  # a safety net: by default the first pass is at 60 s
        while leftover.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        sweeper.stop()


def test_graft_max_attempts_is_how_often_a_job_whose_worker_dies_is_tried(
    settings, base_weights, digit_splits
):
    once = settings.model_copy(update={"max_attempts": 1})
    with TestClient(create_app(once)) as client:
        assert register_digits(client, base_weights).status_code == 201
        archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
        dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
        body = {"model": "digits", "dataset_id": dataset["id"]}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert pipeline.claim_job(once, job_id) == 1
        with session_scope(once.resolved_database_url) as s:  # its worker died: no more beats
            s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
        with session_scope(once.resolved_database_url) as s:
            assert sweep(s, once, None) == []  # not re-queued: its one attempt is used
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert "all 1 attempts" in job["error"]["message"]


def test_graft_db_retry_s_is_how_long_a_final_write_waits_for_the_database(caplog):
    away = f"postgresql+psycopg://graft@127.0.0.1:{free_port()}/graft"  # nothing listens

    def write() -> None:
        with session_scope(away) as s:
            s.scalar(select(Job.id).limit(1))

    caplog.set_level(logging.WARNING, logger="worker.lifecycle")
    for retry_s in (0.0, 2.0):
        caplog.clear()
        with pytest.raises(Exception, match="Connection refused|connection failed"):
            with_retries(Settings(db_retry_s=retry_s), "recording the job", write)
        retries = [r for r in caplog.records if "the database is unreachable" in r.message]
        if retry_s == 0:
            assert retries == []  # gave up at once
        else:
            assert len(retries) >= 2, [r.message for r in caplog.records]


def test_graft_min_retention_images_is_what_retention_needs_to_be_measured(
    settings, client, model, digit_splits
):
    """18 images of the old labels, 9 of them measured: too few at the default (20), enough
    at 5. The API's
    setting counts, when the job is submitted: the job keeps the gate it was given."""
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=4)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits", "base_version": 1, "dataset_id": dataset["id"]}
    decisions = {}
    for needed in (20, 5):
        api = settings.model_copy(update={"min_retention_images": needed})
        with TestClient(create_app(api)) as submitting:
            job_id = submitting.post("/v1/jobs", json=body).json()["id"]
        pipeline.run_job(job_id, settings)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        decisions[needed] = job["metrics"]["gate"]["decision"]
    assert decisions[20] == "unverified"
    assert decisions[5] != "unverified", (decisions, job["metrics"]["gate"]["reason"])


def test_graft_reference_selection_is_how_a_job_picks_the_images_it_keeps(
    settings, client, model, digit_splits
):
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=10)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits", "base_version": 1, "dataset_id": dataset["id"]}
    kept = {}
    for method in ("random", "herding"):
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        worker = {"reference_per_label": 3, "reference_selection": method}
        pipeline.run_job(job_id, settings.model_copy(update=worker))
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        with session_scope(settings.resolved_database_url) as s:
            version = s.scalar(
                select(ModelVersion).where(ModelVersion.version == job["result"]["version"])
            )
            kept[method] = set(read_manifest(open_storage(settings), version.reference))
    for chosen in kept.values():  # 3 of each label's 10, either way
        labels = [label for _, label in chosen]
        assert sorted(set(labels)) == [str(d) for d in range(10)]
        assert all(labels.count(label) == 3 for label in set(labels))
    assert kept["random"] != kept["herding"]


def test_graft_extract_workers_decode_the_images_in_processes_of_their_own(settings, job_id):
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # the job's loader processes are this process's children
        while not done.wait(0.01):
            seen.append(len(multiprocessing.active_children()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        pipeline.run_job(job_id, settings.model_copy(update={"extract_workers": 2}))
    finally:
        done.set()
        watcher.join()
    assert max(seen) == 2, sorted(set(seen))
