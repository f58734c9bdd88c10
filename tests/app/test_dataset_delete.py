"""Deleting a dataset: a deletion the database refuses leaves the dataset whole, its images
included; one it accepts is done, and takes the images too (now, or by the sweep)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import text

from app.main import create_app
from core.db import get_engine, session_scope, utcnow
from core.janitor import clean
from core.migrate import db_upgrade
from core.models import Dataset
from core.settings import Settings
from core.storage import open_storage
from tests.app.test_datasets import make_zip, png
from tests.core.test_storage import moto_server

# A commit that fails at COMMIT itself: an update of ``deleted_at`` records a row that breaks a
# deferred foreign key, which SQLite checks only when the transaction commits.
REFUSE_DELETION = [
    "CREATE TABLE refused (dataset_id VARCHAR REFERENCES datasets (id) "
    "DEFERRABLE INITIALLY DEFERRED)",
    "CREATE TRIGGER refuse_deletion AFTER UPDATE OF deleted_at ON datasets "
    "BEGIN INSERT INTO refused VALUES ('no such dataset'); END",
]


def test_a_deletion_that_fails_to_commit_keeps_the_dataset_and_its_images(client, settings):
    archive = make_zip({"cat/1.png": png(color=10), "dog/1.png": png(color=200)})
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    key = f"datasets/{dataset['id']}/images.tar"
    storage = open_storage(settings)
    stored = storage.open(key).read()

    with get_engine(settings.resolved_database_url).begin() as conn:
        for statement in REFUSE_DELETION:
            conn.execute(text(statement))
    response = client.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 500

    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [dataset["id"]]
    assert storage.exists(key), "the images went, the dataset stayed"
    assert storage.open(key).read() == stored

    with get_engine(settings.resolved_database_url).begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_deletion"))
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert not storage.exists(key)


def test_a_committed_deletion_stands_when_the_store_is_away(tmp_path):
    """The row is deleted first; images the store cannot delete now are the sweep's."""
    with moto_server(tmp_path) as (endpoint, s3):
        settings = Settings(
            data_dir=tmp_path / "var",
            sweep_interval_s=0,
            poll_cache_s=0,
            orphan_grace_s=0,
            storage_url="s3://graft-test/away",
            s3_endpoint_url=endpoint,
        )
        db_upgrade(settings)
        archive = make_zip({"cat/1.png": png(color=10), "dog/1.png": png(color=200)})
        with TestClient(create_app(settings)) as client:
            dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
            s3.terminate()
            s3.wait(timeout=10)
            assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
            assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
            assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 404


def test_the_sweep_removes_images_a_deletion_left_behind(client, settings):
    archive = make_zip({"cat/1.png": png(color=10)})
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    key = f"datasets/{dataset['id']}/images.tar"
    with session_scope(settings.resolved_database_url) as session:  # deleted; images kept
        session.get(Dataset, dataset["id"]).deleted_at = utcnow()
    assert open_storage(settings).exists(key)
    assert clean(settings.model_copy(update={"orphan_grace_s": 0})).objects == 1
    assert not open_storage(settings).exists(key)
