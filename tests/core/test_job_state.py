"""The job state machine: its transitions are the only way a job's row changes, a final job
stays final whatever writes race for it, and no other module updates a job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core import job_state
from core.db import session_scope, utcnow
from core.job_state import FINAL, TRANSITIONS, allowed
from core.models import JobStatus
from devkit.digits import digits_archive

Q, R = JobStatus.QUEUED, JobStatus.RUNNING
ROOT = Path(__file__).resolve().parents[2]


def test_the_transitions_run_queued_to_running_to_a_final_state_and_never_out_of_one():
    assert all(not (sources & FINAL) for sources, _ in TRANSITIONS.values())
    assert allowed(Q, R) and allowed(R, JobStatus.SUCCEEDED) and allowed(R, Q)
    assert allowed(Q, JobStatus.CANCELLED)  # a queued job is cancelled at once
    assert not allowed(Q, JobStatus.SUCCEEDED) and not allowed(Q, JobStatus.FAILED)
    for final in FINAL:
        assert not any(allowed(final, s) for s in JobStatus)
    reached, frontier = {Q}, [Q]
    while frontier:
        state = frontier.pop()
        for target in JobStatus:
            if allowed(state, target) and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(JobStatus)


@pytest.fixture()
def job_id(client, model, digit_splits):
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits", "dataset_id": dataset["id"]}
    return client.post("/v1/jobs", json=body).json()["id"]


def test_a_job_goes_through_its_states_and_a_finished_one_refuses_every_write(
    settings, client, job_id
):
    url = settings.resolved_database_url
    with session_scope(url) as s:
        assert job_state.claim(s, job_id, 30, "w/1") == 1
        assert job_state.claim(s, job_id, 30, "w/2") is None  # taken
        assert job_state.beat(s, job_id, 1, 30, None) == (True, False)
        assert job_state.beat(s, job_id, 2, 30, None)[0] is False  # not that attempt's
        assert job_state.hand_back(s, job_id, 1, "shutdown")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    with session_scope(url) as s:
        assert job_state.claim(s, job_id, 30, "w/3") == 1  # the attempt was handed back
        with pytest.raises(ValueError, match="cannot leave a job queued"):
            job_state.finish(s, job_id, 1, Q)
        assert job_state.finish(s, job_id, 1, JobStatus.SUCCEEDED)
    with session_scope(url) as s:  # every writer, racing too late
        assert job_state.claim(s, job_id, 30, "w/4") is None
        assert job_state.beat(s, job_id, 1, 30, {"stage": "x"})[0] is False
        assert not job_state.finish(s, job_id, 1, JobStatus.FAILED)
        assert not job_state.hand_back(s, job_id, 1, "late")
        assert not job_state.cancel(s, job_id)
        assert job_state.recover(s, job_id, 1, utcnow(), False, False, 3) is None
        job_state.ring_again(s, [job_id], utcnow())
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempt"] == 1
    assert job["progress"]["stage"] == "done"


def test_a_success_is_not_written_over_a_cancel_request(settings, client, job_id):
    url = settings.resolved_database_url
    with session_scope(url) as s:
        attempt = job_state.claim(s, job_id, 30, "w/1")
        assert job_state.cancel(s, job_id)  # running: asked to stop
        assert job_state.beat(s, job_id, attempt, 30, None) == (True, True)
        assert not job_state.finish(s, job_id, attempt, JobStatus.SUCCEEDED)
        assert job_state.finish(s, job_id, attempt, JobStatus.CANCELLED)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_no_module_but_the_state_machine_updates_a_job():
    writers = []
    for folder in ("engine", "core", "app", "worker", "graft"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func) in ("update", "sa.update", "sqlalchemy.update")
                    and node.args
                    and ast.unparse(node.args[0]) == "Job"
                ):
                    writers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert writers and all(w.startswith("core/job_state.py") for w in writers), writers
