"""The job pipeline in-process: claim, run, fenced finish, and the sweep's recoveries."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.sweeper import sweep
from core.db import session_scope, utcnow
from core.models import Job, ModelVersion
from core.storage import open_storage
from devkit.digits import digits_archive
from worker import pipeline
from worker.spec import load_spec


@pytest.fixture()
def job_id(client, model, digit_splits):
    archive = digits_archive(digit_splits[1], old_per_class=20, new_shots=10)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    response = client.post(
        "/v1/jobs",
        json={
            "model": "digits",
            "dataset_id": dataset["id"],
            "config": {"gate": {"min_retention": 0.9}},
        },
    )
    return response.json()["id"]


def versions(settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return s.scalar(select(func.count()).select_from(ModelVersion))


def set_job(settings, job_id, **values):
    with session_scope(settings.resolved_database_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_job_runs_once_and_adds_one_version(settings, client, job_id):
    pipeline.run_job(job_id, settings)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"] == {"model": "digits", "version": 2, "gate": "promoted"}
    assert job["progress"]["stage"] == "done" and job["attempt"] == 1
    assert job["metrics"]["gate"]["decision"] == "promoted"

    pipeline.run_job(job_id, settings)  # a duplicate delivery does nothing
    assert versions(settings) == 2
    version = client.get("/v1/models/digits/versions/2").json()
    assert version["status"] == "promoted" and version["parent_version"] == 1
    assert version["formats"] == ["safetensors", "onnx", "torchscript"]
    assert version["labels"][-1] == "9" and version["metrics"] == job["metrics"]
    assert client.get("/v1/models/digits").json()["latest_version"] == 2
    assert list(settings.tmp_dir.iterdir()) == []

    # what its refits cost is in its metrics; had they taken minutes on the CPU, it would say
    refit = job["metrics"]["refit"]
    assert refit["device"] == "cpu" and refit["count"] == 6
    assert not any("GPU worker" in w for w in job["warnings"])
    slow = job["metrics"] | {"refit": refit | {"seconds": 600}}
    said = pipeline.outcome_warnings(slow["gate"], load_spec(settings, job_id), 2, slow)
    assert any("took 10 minutes on the CPU" in w and "GPU worker" in w for w in said), said


def test_a_second_job_on_a_dataset_reads_the_pixels_the_first_decoded(settings, client, job_id):
    pipeline.run_job(job_id, settings)
    first = client.get(f"/v1/jobs/{job_id}").json()
    assert first["metrics"]["decoded_cache"]["state"] == "stored", first["metrics"]
    body = {"model": "digits", "base_version": 1, "dataset_id": first["dataset_id"]}
    again = client.post("/v1/jobs", json=body | {"config": {"gate": {"min_retention": 0.9}}})
    # GRAFT_DECODE=device: batches made in the worker's process (on a GPU, by nvJPEG); on a
    # CPU from the loaders' pixels, so it reads what they kept
    pipeline.run_job(again.json()["id"], settings.model_copy(update={"decode": "device"}))
    second = client.get(f"/v1/jobs/{again.json()['id']}").json()
    assert second["status"] == "succeeded", second["error"]
    decoded = first["metrics"]["decoded_cache"]
    assert second["metrics"]["decoded_cache"] == decoded | {"state": "hit"}
    assert decoded["images"] == 9 * 20 + 10  # every image of the dataset, once
    assert first["metrics"]["decoding"] == {"where": "loaders", "decoder": "pil"}
    assert second["metrics"]["decoding"] == {
        "where": "device",
        "decoder": "pil",
        "images": {"stored": decoded["images"]},
    }
    # the same pixels, so the same figures
    assert second["metrics"]["old_classes"] == first["metrics"]["old_classes"]
    assert second["metrics"]["gate"]["decision"] == first["metrics"]["gate"]["decision"]
    folder = settings.decoded_dir / first["dataset_id"]
    assert [p.suffix for p in folder.iterdir()] == [".u8"]
    assert client.delete(f"/v1/datasets/{first['dataset_id']}").status_code == 204
    assert not folder.exists()  # the dataset's pixels go with it

    # a worker with a disk of its own still holds them: they go when it ends its next job
    (folder / "pixels.u8").parent.mkdir(parents=True)
    (folder / "pixels.u8").write_bytes(bytes(10))
    pipeline.run_job(job_id, settings)  # a duplicate delivery: nothing to run, but it ends
    assert not folder.exists()


def test_a_job_over_the_feature_memory_budget_spills_and_cleans_up(settings, client, job_id):
    config = client.get(f"/v1/jobs/{job_id}").json()["config"]
    set_job(settings, job_id, config={**config, "calibration": "weight_aligning"})
    pipeline.run_job(job_id, settings.model_copy(update={"feature_memory_mb": 0}))
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["feature_cache"]["disk_bytes"] > 0
    assert job["metrics"]["feature_cache"]["memory_bytes"] == 0
    assert job["metrics"]["calibration"]["method"] == "weight_aligning"
    assert list(settings.tmp_dir.iterdir()) == []


def test_a_version_below_the_retention_gate_is_stored_as_rejected(settings, client, job_id):
    set_job(
        settings,
        job_id,
        config={
            **client.get(f"/v1/jobs/{job_id}").json()["config"],
            "gate": {"min_retention": 1.0, "margin": 0.0},
            "solver": "sgd",
            "epochs": 0,
            "calibration": "none",  # imprinted rows, uncorrected, take some old images
        },
    )
    pipeline.run_job(job_id, settings)
    job = client.get(f"/v1/jobs/{job_id}").json()
    gate = job["metrics"]["gate"]
    assert job["status"] == "succeeded" and gate["decision"] == "rejected"
    assert "below the 100.0% minimum" in gate["reason"]
    assert client.get("/v1/models/digits/versions/2").json()["status"] == "rejected"
    assert client.get("/v1/models/digits").json()["latest_version"] == 1


def test_a_finish_from_a_lost_attempt_is_fenced_off(settings, client, job_id):
    first = pipeline.claim_job(settings, job_id)
    set_job(settings, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == [job_id]  # the worker is presumed dead: re-queued
    second = pipeline.claim_job(settings, job_id)
    assert (first, second) == (1, 2)

    spec = load_spec(settings, job_id)
    with pytest.raises(pipeline.LeaseLost):
        pipeline._finish_succeeded(settings, job_id, first, spec, "v", _Result(), [], None)
    assert versions(settings) == 1
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


class _Result:
    labels = [str(d) for d in range(10)]
    metrics = {"old_classes": {"retention": 1.0}}


def test_the_sweep_rings_again_only_for_queued_jobs_the_broker_lacks(settings, job_id):
    def swept(waiting: set[str], broker_up: bool = True) -> list[str]:
        with session_scope(settings.resolved_database_url) as s:
            return sweep(s, settings, waiting, broker_up)

    assert swept(set()) == []  # just submitted: its message may be on the way
    set_job(settings, job_id, queued_at=utcnow() - timedelta(seconds=10))
    assert swept({job_id}) == []  # the broker has it: no second message, however long it waits
    set_job(settings, job_id, queued_at=utcnow() - timedelta(days=1))
    assert swept({job_id}) == []
    assert swept(set(), broker_up=False) == []  # down: nothing can be sent
    assert swept(set()) == [job_id]  # lost by the broker, or never sent: ring again
    set_job(settings, job_id, status="cancelled")
    assert swept(set()) == []


def test_a_broker_that_cannot_be_read_gets_stale_queued_jobs_again(settings, job_id):
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == []
    set_job(settings, job_id, queued_at=utcnow() - timedelta(hours=1))
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == [job_id]
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == []  # its clock was reset


@pytest.mark.fault("a job keeps killing its workers")
def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(
    settings, client, job_id, observed
):
    set_job(
        settings,
        job_id,
        status="running",
        attempt=3,
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == []
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    observed(f"lease lost on attempt 3 of 3: {job['status']}, {job['error']['code']}")
    pipeline.run_job(job_id, settings)
    assert versions(settings) == 1


def test_a_job_whose_dataset_vanished_fails_clearly(settings, client, job_id):
    with session_scope(settings.resolved_database_url) as s:
        key = s.get(Job, job_id).dataset.storage_key
    open_storage(settings).delete(key)
    pipeline.run_job(job_id, settings)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and "dataset" in job["error"]["message"]
    assert versions(settings) == 1


@pytest.mark.fault("a job runs past `GRAFT_JOB_TIME_LIMIT_S`")
def test_a_job_past_its_time_limit_fails_with_code_timeout(settings, client, job_id, observed):
    pipeline.run_job(job_id, settings.model_copy(update={"job_time_limit_s": 0}))
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    observed(f"a limit of 0 s: {job['status']}, {job['error']['code']}, no version")
    assert versions(settings) == 1


@pytest.mark.fault("a job runs past `GRAFT_JOB_TIME_LIMIT_S`")
def test_a_worker_silent_past_the_hard_limit_is_not_retried(settings, client, job_id, observed):
    set_job(
        settings,
        job_id,
        status="running",
        attempt=1,
        started_at=utcnow() - timedelta(days=2),
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    with session_scope(settings.resolved_database_url) as s:
        assert sweep(s, settings, None) == []
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "timeout"
    observed(f"a worker silent 2 days into its job: the sweep failed it, {job['error']['code']}")
