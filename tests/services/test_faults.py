"""Outages of the broker and the database, on private Redis and PostgreSQL servers: queued jobs
start once the broker is back, the sweep sends each lost message once, and a job whose work is
done survives the database going away at its final write."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import update

from app.sweeper import Sweeper
from core.db import session_scope, utcnow
from core.models import Job
from tests.support.cluster import FINAL, SLOW


@pytest.mark.fault("Redis is down while jobs are submitted")
def test_jobs_submitted_while_the_broker_is_down_start_when_it_is_back(
    cluster, redis_server, observed
):
    # A sweep interval far longer than the test: only noticing the outage can send the jobs.
    sweeper = Sweeper(cluster.settings.model_copy(update={"sweep_interval_s": 3600}))
    sweeper.start()
    try:
        cluster.worker()
        redis_server.stop()
        job_ids = [cluster.submit({"epochs": 2}) for _ in range(2)]  # 202: safe in the database
        assert {cluster.job(j)["status"] for j in job_ids} == {"queued"}
        redis_server.start()
        back = datetime.now(UTC)
        jobs = cluster.wait(job_ids, FINAL, sweep=False)
    finally:
        sweeper.stop()
    observed(
        "2 jobs submitted while Redis was down, both 202; one worker (started as Redis "
        "stopped) began them "
        + " and ".join(f"{(_started(j) - back).total_seconds():.1f}" for j in jobs)
        + " s after its return, in turn"
    )
    assert [j["status"] for j in jobs] == ["succeeded"] * 2
    assert all(j["attempt"] == 1 for j in jobs)


@pytest.mark.fault("Redis is down for long")
def test_after_a_long_broker_outage_a_job_starts_within_seconds_of_its_return(
    cluster, redis_server, observed
):
    """Graft's workers try a lost broker every second (Celery's own tries wait 2 s more each
    time), so a job queued during an outage starts once the broker is back."""
    sweeper = Sweeper(cluster.settings.model_copy(update={"sweep_interval_s": 3600}))
    sweeper.start()
    try:
        cluster.worker()
        cluster.wait([cluster.submit()], FINAL, sweep=False)  # the worker is connected
        redis_server.stop()
        job_id = cluster.submit()
        time.sleep(20)
        redis_server.start()
        back = datetime.now(UTC)
        job = cluster.wait([job_id], {"running", *FINAL}, sweep=False)[0]
    finally:
        sweeper.stop()
    started = _started(job)
    observed(f"a 20 s outage; the job started {(started - back).total_seconds():.1f} s after")
    # the job started after the outage, without the sweep (an hour away); how many seconds
    # it took is a figure for bench/faults.py and bench/RESULTS.md, not an assertion
    assert started >= back - timedelta(seconds=1)


@pytest.mark.fault("many workers, duplicate messages")
def test_the_sweep_sends_each_lost_message_once(cluster, redis_url, observed):
    broker = redis.Redis.from_url(redis_url)
    job_ids = [cluster.submit() for _ in range(3)]  # no worker: they wait in the queue
    with session_scope(cluster.settings.resolved_database_url) as session:
        long_ago = utcnow() - timedelta(days=1)
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(queued_at=long_ago))
    assert broker.llen("graft") == 3
    for _ in range(3):
        assert cluster.sweeper.run_once() == 0  # the broker holds them: nothing to send
    assert broker.llen("graft") == 3
    broker.flushdb()  # the broker forgets
    assert cluster.sweeper.run_once() == 3
    assert cluster.sweeper.run_once() == 0
    assert broker.llen("graft") == 3
    cluster.worker()
    jobs = cluster.wait(job_ids, FINAL, sweep=False)
    observed(
        "3 sweeps with the messages in Redis sent 0; after a flush one sent 3, the next 0; "
        f"attempts {[j['attempt'] for j in jobs]}"
    )
    assert [j["attempt"] for j in jobs] == [1, 1, 1]
    assert cluster.versions() == [1, 2, 3, 4]


@pytest.mark.fault("PostgreSQL is down when a job finishes")
def test_a_job_done_while_the_database_is_down_is_recorded_when_it_is_back(
    cluster, pg_cluster, observed
):
    worker = cluster.worker(GRAFT_JOB_LEASE_S="120")  # the default lease outlasts the outage
    job_id = cluster.submit(SLOW)
    cluster.wait_running(job_id)
    worker.send_signal(signal.SIGSTOP)
    pg_cluster.stop()
    stopped = time.monotonic()
    worker.send_signal(signal.SIGCONT)
    log = cluster.logs / "worker0.log"
    deadline = time.monotonic() + 300
    while "recording the new version: the database is unreachable" not in log.read_text():
        assert time.monotonic() < deadline and worker.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(5)  # a few retries fail
    pg_cluster.start()
    down_s, back = time.monotonic() - stopped, time.monotonic()
    (job,) = cluster.wait([job_id], FINAL)
    observed(
        f"PostgreSQL stopped for {down_s:.0f} s at the final write; {job['status']} on attempt "
        f"{job['attempt']}, recorded {time.monotonic() - back:.1f} s after its return"
    )
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert cluster.versions() == [1, 2]
    assert len(cluster.stored_files()) == 10  # nothing discarded, nothing twice
    assert list(cluster.settings.tmp_dir.iterdir()) == []


def _started(job: dict) -> datetime:
    return datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))
