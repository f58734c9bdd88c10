"""Settings that the README documents act as it says: the heartbeat's interval, its bound by
the lease, and how often the janitor runs."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from app.db import session_scope
from app.models import Job
from app.settings import Settings
from app.sweeper import Sweeper
from devkit.digits import digits_archive, register_digits
from worker import pipeline
from worker.lifecycle import Heartbeat


@pytest.fixture()
def job_id(client, base_weights, digit_splits):
    assert register_digits(client, base_weights).status_code == 201
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
