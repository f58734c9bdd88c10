"""A disk below the free-space floor: uploads are refused with 507 before anything is written,
/readyz says so, and a worker fails the job as disk_full instead of filling the disk."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import MiB
from tests.conftest import digits_archive, register_digits
from worker import pipeline


@pytest.fixture()
def crowded(settings):
    """The same server, with a floor above the free space it has."""
    free = shutil.disk_usage(settings.data_dir).free
    return settings.model_copy(update={"min_free_disk_mb": free // MiB + 1})


def test_uploads_on_a_crowded_disk_are_507_and_leave_nothing(crowded, base_weights, digit_splits):
    with TestClient(create_app(crowded)) as client:
        archive = digits_archive(digit_splits[1], old_per_class=2)
        dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)})
        model = register_digits(client, base_weights)
        ready = client.get("/readyz")
        assert client.get("/v1/datasets").json()["items"] == []
        assert client.get("/v1/models").json()["items"] == []
    for response, what in ((dataset, "this archive"), (model, "these weights")):
        assert response.status_code == 507, response.text
        assert response.headers["content-type"] == "application/problem+json"
        detail = response.json()["detail"]
        assert detail.startswith(f"{what} needs about") and "GRAFT_MIN_FREE_DISK_MB" in detail
    assert ready.status_code == 503 and ready.json()["checks"]["disk"] is False
    assert list(crowded.tmp_dir.iterdir()) == []
    assert not (crowded.data_dir / "artifacts").exists() or not any(
        p.is_file() for p in (crowded.data_dir / "artifacts").rglob("*")
    )


def test_a_worker_on_a_crowded_disk_fails_the_job_as_disk_full(
    settings, crowded, client, base_weights, digit_splits
):
    assert register_digits(client, base_weights).status_code == 201
    archive = digits_archive(digit_splits[1], old_per_class=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job_id = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    job_id = job_id.json()["id"]
    pipeline.run_job(job_id, crowded)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "disk_full"
    assert "GRAFT_MIN_FREE_DISK_MB" in job["error"]["message"]
    assert [v["version"] for v in client.get("/v1/models/digits").json()["versions"]] == [1]
