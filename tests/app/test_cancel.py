"""Cancel says what it did. Cancelling wins until a job's final write: asked while the job is
still exporting its files, the answer is 202 and the job ends cancelled with nothing of it
kept; asked after the version is recorded, the answer is 409 naming that version."""

from __future__ import annotations

import threading
import time

from app.schemas import JobRead
from devkit.digits import digits_archive
from graft.cli_jobs import state_of
from worker import pipeline


def submit(client, digit_splits) -> str:
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=10)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    return client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()[
        "id"
    ]


def stored_files(settings) -> list:
    return sorted(p for p in (settings.data_dir / "artifacts" / "models").rglob("*") if p.is_file())


def test_a_cancel_during_the_export_wins_and_nothing_of_the_job_is_kept(
    settings, client, model, digit_splits
):
    job_id = submit(client, digit_splits)
    before = stored_files(settings)
    # progress is saved at every heartbeat: often, so that the export stage is seen in time
    quick = settings.model_copy(update={"heartbeat_s": 0.05})
    worker = threading.Thread(target=pipeline.run_job, args=(job_id, quick))
    worker.start()
    deadline = time.monotonic() + 300
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["stage"] != "exporting":
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.002)
    answer = client.post(f"/v1/jobs/{job_id}/cancel")
    worker.join(300)

    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "running"  # asked to stop; it stops before recording
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled", job
    assert [v["version"] for v in client.get("/v1/models/digits").json()["versions"]] == [1]
    # the version's files are gone; shared reference images and features wait for the janitor
    shared = {"reference", "features"}
    left = [p for p in stored_files(settings) if p not in before and not shared & set(p.parts)]
    assert left == [] == []


def test_a_cancel_after_the_version_is_recorded_is_409_naming_it(
    settings, client, model, digit_splits
):
    job_id = submit(client, digit_splits)
    pipeline.run_job(job_id, settings)
    answer = client.post(f"/v1/jobs/{job_id}/cancel")
    assert answer.status_code == 409
    assert answer.headers["content-type"] == "application/problem+json"
    assert "too late" in answer.json()["detail"]
    assert "recorded version 2 of digits" in answer.json()["detail"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    # `graft job list` shows what the job made of it, not only "succeeded"
    assert state_of(JobRead.model_validate(job)) == f"v2 {job['result']['gate']}"
