"""Deleting versions and models: a deleted version stays readable as a tombstone and loses its
files; a deleted model takes everything of it along and frees its name. A deletion the
database refuses changes nothing; one it accepts stands, even when the store is away."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from app.auth import LOCAL_OWNER
from app.deletion import delete_version
from app.main import create_app
from core.db import get_engine, session_scope
from core.janitor import clean
from core.migrate import db_upgrade
from core.models import JobStatus, Model, ModelVersion
from core.settings import Settings
from devkit import digits as D
from devkit.digits import digits_archive, register_digits
from tests.app.test_api import assert_problem
from tests.app.test_auth import bearer, new_key
from tests.core.test_storage import moto_server
from worker import pipeline
from worker.lifecycle import Heartbeat, StopReason, claim_job, finish, job_error

FORMATS = ("safetensors", "onnx", "torchscript")


def upload(client: TestClient, archive: bytes) -> dict:
    response = client.post("/v1/datasets", files={"archive": ("d.zip", archive)})
    assert response.status_code == 201, response.text
    return response.json()


def submit(client: TestClient, dataset: dict, **body: object) -> dict:
    response = client.post(
        "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"], **body}
    )
    assert response.status_code == 202, response.text
    return response.json()


def files_of(settings: Settings, name: str, version: int | None = None) -> list[Path]:
    """The files in the data folder that belong to the model (or to one of its versions)."""
    with session_scope(settings.resolved_database_url) as session:
        model_id = session.scalar(select(Model.id).where(Model.name == name))
        folder = settings.data_dir / "artifacts" / "models" / model_id
        if version is not None:
            version_id = session.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.model_id == model_id, ModelVersion.version == version
                )
            )
            folder = folder / version_id
    return [p for p in folder.rglob("*") if p.is_file()]


def model_files(settings: Settings) -> list[Path]:
    return [p for p in (settings.data_dir / "artifacts" / "models").rglob("*") if p.is_file()]


@pytest.fixture()
def lineage(client, settings, model, digit_splits) -> dict:
    """Version 1 (registered, promoted, latest) and version 2, made from it by a job that had
    images of the new label only: unverified, so version 1 stays the latest. The job."""
    nines = upload(client, D.zip_image_folder({"9": digit_splits[1].of(9)[:10]}))
    job = submit(client, nines)
    pipeline.run_job(job["id"], settings)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["version"] == 2 and job["result"]["gate"] == "unverified"
    return job


def test_a_deleted_version_loses_its_files_and_stays_readable_as_a_tombstone(
    client, settings, lineage, digit_splits
):
    assert client.post("/v1/models/digits/versions/2/promote").status_code == 200
    before = client.get("/v1/models/digits/versions/1").json()
    assert before["formats"] == list(FORMATS) and before["deleted_at"] is None
    assert files_of(settings, "digits", 1)

    assert client.delete("/v1/models/digits/versions/1").status_code == 204

    assert files_of(settings, "digits", 1) == []
    assert files_of(settings, "digits", 2), "the other version's files went too"
    tombstone = client.get("/v1/models/digits/versions/1").json()
    assert tombstone["status"] == "deleted" and tombstone["deleted_at"]
    assert tombstone["formats"] == [] and tombstone["reference"] == {}
    assert tombstone["sha256"] is None and tombstone["size_bytes"] is None
    for kept in ("labels", "architecture", "parent_version", "preprocessing", "created_at"):
        assert tombstone[kept] == before[kept]
    child = client.get("/v1/models/digits/versions/2").json()
    assert child["parent_version"] == 1 and child["formats"]
    model = client.get("/v1/models/digits").json()
    assert model["latest_version"] == 2
    assert [(v["version"], v["status"]) for v in model["versions"]] == [
        (1, "deleted"),
        (2, "promoted"),
    ]
    assert model["versions"][0]["deleted_at"] == tombstone["deleted_at"]
    assert client.get("/v1/models").json()["items"][0]["versions"][0]["status"] == "deleted"

    for fmt in FORMATS:
        url = f"/v1/models/digits/versions/1/artifact?format={fmt}"
        assert_problem(client.get(url), 410, says="was deleted")
        assert client.head(url).status_code == 410
    png = D.png_bytes(digit_splits[1].of(3)[0])
    predict = client.post("/v1/models/digits/versions/1/predict", files={"image": ("a.png", png)})
    assert_problem(predict, 410, says="was deleted")
    assert_problem(client.post("/v1/models/digits/versions/1/promote"), 410)
    reference = client.post("/v1/models/digits/versions/1/reference", json={"dataset_id": "x"})
    assert_problem(reference, 410)
    assert_problem(client.delete("/v1/models/digits/versions/1"), 410, says="was deleted")
    assert_problem(client.delete("/v1/models/digits/versions/1?force=true"), 410)
    assert_problem(client.delete("/v1/models/digits/versions/9"), 404)

    # the job that made version 2 from it reads as before
    assert client.get(f"/v1/jobs/{lineage['id']}").json() == lineage


def test_deleting_the_latest_version_moves_latest_to_the_newest_promoted_one_left(client, lineage):
    assert client.post("/v1/models/digits/versions/2/promote").json()["latest_version"] == 2

    assert client.delete("/v1/models/digits/versions/2").status_code == 204
    assert client.get("/v1/models/digits").json()["latest_version"] == 1
    job = client.get(f"/v1/jobs/{lineage['id']}")
    assert job.status_code == 200 and job.json()["result"]["version"] == 2
    assert [j["id"] for j in client.get("/v1/jobs?model=digits").json()["items"]] == [lineage["id"]]

    # the only version left, and no job on the model: nothing to protect
    assert client.delete("/v1/models/digits/versions/1").status_code == 204
    model = client.get("/v1/models/digits").json()
    assert model["latest_version"] is None
    assert [v["status"] for v in model["versions"]] == ["deleted", "deleted"]


def test_the_last_promoted_version_is_kept_unless_forced(client, settings, lineage):
    body = assert_problem(client.delete("/v1/models/digits/versions/1"), 409, says="force=true")
    assert "last promoted version" in body["detail"]
    assert client.get("/v1/models/digits").json()["latest_version"] == 1
    assert client.get("/v1/models/digits/versions/1").json()["status"] == "promoted"
    assert client.get("/v1/models/digits/versions/1/artifact").status_code == 200

    assert client.delete("/v1/models/digits/versions/1?force=true").status_code == 204
    model = client.get("/v1/models/digits").json()
    assert model["latest_version"] is None
    assert [(v["version"], v["status"]) for v in model["versions"]] == [
        (1, "deleted"),
        (2, "unverified"),
    ]
    assert client.get("/v1/models/digits/versions/2/artifact").status_code == 200


def test_a_version_an_unfinished_job_builds_on_is_kept_even_with_force(
    client, settings, model, digit_splits
):
    dataset = upload(client, digits_archive(digit_splits[1], old_per_class=3, new_shots=3))
    queued = submit(client, dataset)
    body = assert_problem(client.delete("/v1/models/digits/versions/1?force=true"), 409)
    assert queued["id"] in body["detail"] and "cancel" in body["detail"]
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 202

    running = submit(client, dataset)
    attempt = claim_job(settings, running["id"])  # a worker has taken it
    assert attempt == 1
    body = assert_problem(client.delete("/v1/models/digits/versions/1?force=true"), 409)
    assert f"{running['id']} (running)" in body["detail"]
    assert client.get("/v1/models/digits/versions/1/artifact").status_code == 200

    finish(settings, running["id"], attempt, JobStatus.FAILED, job_error("test", "stopped"))
    assert client.delete("/v1/models/digits/versions/1").status_code == 204


def test_deleting_a_model_removes_its_files_versions_and_jobs_and_frees_its_name(
    client, settings, base_weights, digit_splits
):
    held = digit_splits[1]
    reference = upload(client, D.zip_image_folder({"0": held.of(0)[:5], "1": held.of(1)[:5]}))
    registered = register_digits(client, base_weights, reference=reference["id"])
    assert registered.status_code == 201 and registered.json()["reference"] == {"0": 5, "1": 5}
    dataset = upload(client, digits_archive(held, old_per_class=3, new_shots=3))
    job = submit(client, dataset)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    # version 1's files in three formats, its reference manifest and images
    assert len(files_of(settings, "digits")) >= len(FORMATS) + 1 + 10

    assert client.delete("/v1/models/digits").status_code == 204

    assert model_files(settings) == []
    assert_problem(client.get("/v1/models/digits"), 404)
    assert_problem(client.get("/v1/models/digits/versions/1"), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404)
    assert client.get("/v1/models").json()["items"] == []
    assert client.get("/v1/jobs").json()["items"] == []
    assert_problem(client.delete("/v1/models/digits"), 404)
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 200  # not the model's

    again = register_digits(client, base_weights)
    assert again.status_code == 201 and again.json()["version"] == 1
    assert client.get("/v1/models/digits").json()["versions"][0]["status"] == "promoted"


def test_a_model_with_unfinished_jobs_is_deleted_only_with_force(
    client, settings, model, digit_splits
):
    dataset = upload(client, digits_archive(digit_splits[1], old_per_class=3, new_shots=3))
    queued, running = submit(client, dataset), submit(client, dataset)
    attempt = claim_job(settings, running["id"])
    assert attempt == 1

    body = assert_problem(client.delete("/v1/models/digits"), 409, says="force=true")
    assert queued["id"] in body["detail"] and running["id"] in body["detail"]
    assert client.get("/v1/models/digits").status_code == 200
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"

    assert client.delete("/v1/models/digits?force=true").status_code == 204
    for job in (queued, running):
        assert_problem(client.get(f"/v1/jobs/{job['id']}"), 404)
    assert model_files(settings) == []
    worker = Heartbeat(settings, running["id"], attempt)  # the running job's worker
    worker.beat()
    assert worker.should_stop() and worker.stop_reason == StopReason.LOST


def test_another_owners_model_and_versions_answer_404(client, settings, base_weights):
    alice, bob = new_key(settings, "alice"), new_key(settings, "bob")
    assert register_digits(client, base_weights, headers=bearer(alice)).status_code == 201

    assert_problem(client.delete("/v1/models/digits", headers=bearer(bob)), 404)
    assert_problem(client.delete("/v1/models/digits/versions/1", headers=bearer(bob)), 404)
    assert client.delete("/v1/models/digits").status_code == 401

    version = client.get("/v1/models/digits/versions/1", headers=bearer(alice)).json()
    assert version["status"] == "promoted" and version["formats"] == list(FORMATS)
    assert client.delete("/v1/models/digits", headers=bearer(alice)).status_code == 204


# Deletions that fail at COMMIT itself: the change records a row that breaks a deferred foreign
# key, which SQLite checks only when the transaction commits.
REFUSED = (
    "CREATE TABLE refused (model_id VARCHAR REFERENCES models (id) DEFERRABLE INITIALLY DEFERRED)"
)
REFUSE_VERSION_DELETION = (
    "CREATE TRIGGER refuse_deletion AFTER UPDATE OF deleted_at ON model_versions "
    "BEGIN INSERT INTO refused VALUES ('no such model'); END"
)
REFUSE_MODEL_DELETION = (
    "CREATE TRIGGER refuse_deletion AFTER DELETE ON models "
    "BEGIN INSERT INTO refused VALUES ('no such model'); END"
)


@pytest.mark.parametrize(
    ("trigger", "path"),
    [
        (REFUSE_VERSION_DELETION, "/v1/models/digits/versions/1"),
        (REFUSE_MODEL_DELETION, "/v1/models/digits"),
    ],
    ids=["version", "model"],
)
def test_a_deletion_that_fails_to_commit_changes_nothing(
    client, settings, model, digit_splits, trigger, path
):
    dataset = upload(client, digits_archive(digit_splits[1], old_per_class=3, new_shots=3))
    job = submit(client, dataset)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    weights = client.get("/v1/models/digits/versions/1/artifact").content
    files = sorted(files_of(settings, "digits"))
    listed = client.get("/v1/models").json()
    with get_engine(settings.resolved_database_url).begin() as conn:
        conn.execute(text(REFUSED))
        conn.execute(text(trigger))

    assert client.delete(path).status_code == 500

    assert client.get("/v1/models").json() == listed
    assert client.get("/v1/models/digits/versions/1").json() == model
    assert client.get("/v1/models/digits/versions/1/artifact").content == weights
    assert sorted(files_of(settings, "digits")) == files
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200

    with get_engine(settings.resolved_database_url).begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_deletion"))
    assert client.delete(path).status_code == 204
    assert model_files(settings) == []


def test_the_sweep_removes_files_a_version_deletion_left_behind(client, settings, model):
    with session_scope(settings.resolved_database_url) as session:  # committed; files kept
        delete_version(session, LOCAL_OWNER, "digits", 1, force=False)
    assert client.get("/v1/models/digits/versions/1").json()["status"] == "deleted"
    left = files_of(settings, "digits", 1)
    assert len(left) == len(FORMATS)

    assert clean(settings.model_copy(update={"orphan_grace_s": 0})).objects == len(left)
    assert model_files(settings) == []


def test_a_committed_deletion_stands_when_the_store_is_away(tmp_path, base_weights, caplog):
    """The rows are deleted first; files the store cannot delete now are the sweep's."""
    with moto_server(tmp_path) as (endpoint, s3):
        settings = Settings(
            data_dir=tmp_path / "var",
            sweep_interval_s=0,
            poll_cache_s=0,
            storage_url="s3://graft-test/away",
            s3_endpoint_url=endpoint,
        )
        db_upgrade(settings)
        with TestClient(create_app(settings)) as client:
            assert register_digits(client, base_weights).status_code == 201
            assert register_digits(client, base_weights, name="other").status_code == 201
            s3.terminate()
            s3.wait(timeout=10)
            assert client.delete("/v1/models/digits/versions/1").status_code == 204
            assert client.get("/v1/models/digits/versions/1").json()["status"] == "deleted"
            assert client.delete("/v1/models/other").status_code == 204
            assert client.get("/v1/models/other").status_code == 404
    assert sum("the sweep will" in r.getMessage() for r in caplog.records) == 2


def test_a_deleted_version_cannot_be_built_on_or_evaluated(client, lineage, digit_splits):
    assert client.delete("/v1/models/digits/versions/2").status_code == 204
    images = upload(client, digits_archive(digit_splits[1], old_per_class=3, new_shots=3))
    grown = client.post(
        "/v1/jobs", json={"model": "digits", "dataset_id": images["id"], "base_version": 2}
    )
    assert_problem(grown, 422, field="base_version", says="version 2 of 'digits' was deleted")
    scored = client.post(
        "/v1/evaluations", json={"model": "digits", "versions": [1, 2], "dataset_id": images["id"]}
    )
    assert_problem(scored, 422, field="versions", says="version 2 of 'digits' was deleted")
