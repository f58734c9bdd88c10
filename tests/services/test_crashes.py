"""Crash tests of the production configuration: real PostgreSQL, real Redis, real worker
processes killed, paused, flushed and restarted. A job is never lost, run twice, or half-written.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import redis

from app.jobs import create_job
from app.schemas import JobCreate
from core.db import session_scope
from tests.support.cluster import FINAL, SLOW

pytestmark = pytest.mark.services


@pytest.mark.fault("a worker is killed mid-training")
def test_a_worker_killed_mid_training_is_replaced_and_the_job_runs_once(cluster, observed):
    first = cluster.worker()
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    stage = cluster.job(job_id)["progress"]["stage"]
    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    cluster.worker()
    (job,) = cluster.wait([job_id], FINAL)
    observed(
        f"SIGKILL while {stage}; {job['status']} on attempt {job['attempt']} "
        f"{time.monotonic() - killed:.1f} s later (lease 3 s); versions {cluster.versions()}"
    )
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert cluster.versions() == [1, 2]
    assert list(cluster.settings.tmp_dir.iterdir()) == []
    # dataset, v1 and v2 (safetensors, onnx, torchscript), v2's reference manifest and lineage,
    # features
    assert len(cluster.stored_files()) == 10
    assert cluster.reference_images() == 9 * 10 + 10  # every image v2 learnt from, once


@pytest.mark.fault("a worker freezes, then wakes up")
def test_a_worker_that_loses_its_lease_cannot_write(cluster, observed):
    workers = {w.pid: w for w in (cluster.worker(), cluster.worker())}
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    paused = workers[cluster.worker_pid(job_id)]
    paused.send_signal(signal.SIGSTOP)  # a frozen process: a GC pause, a partition, a VM stall
    try:
        (job,) = cluster.wait([job_id], FINAL)
    finally:
        paused.send_signal(signal.SIGCONT)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    assert cluster.worker_pid(job_id) != paused.pid
    time.sleep(4)  # the paused worker wakes up, finds its lease gone, and must write nothing
    assert cluster.job(job_id)["attempt"] == 2
    assert cluster.versions() == [1, 2]
    assert len(cluster.stored_files()) == 10  # nothing of the paused attempt's
    assert cluster.reference_images() == 100
    assert paused.poll() is None  # and it lives on to take other jobs
    observed(
        f"SIGSTOP while running; the other worker's attempt 2 {job['status']}; woken, the "
        f"frozen one wrote nothing: versions {cluster.versions()}, "
        f"{len(cluster.stored_files())} stored files"
    )


@pytest.mark.fault("Redis loses its queue")
def test_jobs_survive_a_broker_that_forgets_everything(cluster, redis_server, observed):
    job_ids = [cluster.submit({"epochs": 3}) for _ in range(3)]
    with redis.Redis.from_url(redis_server.url) as broker:
        broker.flushdb()  # every queued message is gone (this test's own Redis)
    cluster.worker()
    jobs = cluster.wait(job_ids, FINAL)
    observed(
        "3 queued jobs, Redis flushed: "
        + ", ".join(f"{j['status']} (attempt {j['attempt']})" for j in jobs)
    )
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    assert cluster.versions() == [1, 2, 3, 4]


@pytest.mark.fault("the API dies between commit and publish")
def test_a_job_committed_but_never_published_is_found_by_the_sweep(cluster, observed):
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
    observed(f"a row with no message: still queued after 3 s; the sweep sent it; {job['status']}")
    assert job["status"] == "succeeded" and job["attempt"] == 1


@pytest.mark.fault("many workers, duplicate messages")
def test_two_workers_run_ten_jobs_exactly_once_each(cluster, observed):
    cluster.worker(), cluster.worker()
    job_ids = [cluster.submit({"epochs": 2}) for _ in range(10)]
    jobs = cluster.wait(job_ids, FINAL)  # the sweep re-sends: duplicates abound
    attempts = sorted(j["attempt"] for j in jobs)
    observed(
        f"10 jobs, 2 workers, the sweep re-sending: attempts {attempts}, versions "
        f"{cluster.versions()[0]}-{cluster.versions()[-1]}"
    )
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert all(j["attempt"] == 1 for j in jobs)
    assert cluster.versions() == list(range(1, 12))
    assert sorted(j["result"]["version"] for j in jobs) == list(range(2, 12))


@pytest.mark.fault("a worker gets SIGTERM")
def test_sigterm_hands_the_running_job_back_without_using_an_attempt(cluster, observed):
    job_id = cluster.submit(SLOW)
    for _ in range(2):  # two deployments in a row
        worker = cluster.worker()
        cluster.wait_running(job_id)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        handed_back = cluster.job(job_id)
        assert handed_back["status"] == "queued", handed_back
        assert "shut down" in handed_back["progress"]["message"]
        assert handed_back["attempt"] == 0
    cluster.worker()
    (job,) = cluster.wait([job_id], FINAL)
    observed(
        f"SIGTERM twice while running: queued at attempt 0 each time; then {job['status']} "
        f"on attempt {job['attempt']}"
    )
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert cluster.versions() == [1, 2]


def test_cancel_stops_a_running_job(cluster):
    cluster.worker()
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    (job,) = cluster.wait([job_id], FINAL, sweep=False)
    assert job["status"] == "cancelled"  # not run to the end: stopped at its next check
    assert cluster.versions() == [1]
    assert len(cluster.stored_files()) == 4  # the dataset and v1's three files


@pytest.mark.fault("PostgreSQL restarts")
def test_the_api_rides_out_a_postgresql_restart(cluster, pg_cluster, observed):
    statuses: list[tuple[float, int]] = []
    restarted = threading.Event()
    failures: list[BaseException] = []

    def restart() -> None:
        try:
            pg_cluster.restart()  # the private cluster: a fast shutdown, then up on its port
        except BaseException as exc:
            failures.append(exc)
        finally:
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
    assert not failures, failures
    refused = [t for t, code in statuses if code != 200]
    back = refused and min(t for t, code in statuses if t > refused[-1])
    observed(
        f"{len(statuses)} reads during the restart: {len(refused)} answered 503 problem+json"
        + (f", 200 again {back - refused[-1]:.2f} s after the last" if refused else "")
    )
    after = [code for t, code in statuses if t > until - 2]
    assert after and set(after) == {200}
