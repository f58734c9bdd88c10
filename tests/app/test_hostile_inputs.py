"""What PostgreSQL refuses never reaches it: NUL and other control characters anywhere in a
request, and integers beyond the columns that store them, are 4xx problems on PostgreSQL as on
SQLite, and nothing is stored before the refusal."""

from __future__ import annotations

import pytest

from devkit import digits as D
from devkit.digits import register_digits
from tests.app.test_api import PROBLEM

INT4 = 2**31  # one past the largest a PostgreSQL integer column holds
HUGE = 2**64


@pytest.fixture(params=["sqlite", "postgres"])
def hostile(request, tmp_path, base_weights):
    """A client of a real app with one registered model (digits), on either database."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.migrate import db_upgrade
    from core.settings import Settings

    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        settings = Settings(database_url=url, data_dir=tmp_path / "var", sweep_interval_s=0)
        settings.ensure_dirs()
        db_upgrade(settings)
    else:
        settings = request.getfixturevalue("settings")
    with TestClient(create_app(settings)) as client:
        assert register_digits(client, base_weights).status_code == 201
        yield client, settings


def refused(response, *statuses: int) -> None:
    assert response.status_code in (statuses or (404, 416, 422)), response.text
    assert response.headers["content-type"] == PROBLEM, response.text


PATHS = [
    "/v1/jobs/%00",
    "/v1/jobs/a%01b",
    "/v1/datasets/%00",
    "/v1/evaluations/%00",
    "/v1/models/%00",
    "/v1/models/digits%00",
    f"/v1/models/digits/versions/{INT4}",
    f"/v1/models/digits/versions/{HUGE}",
    f"/v1/models/digits/versions/{INT4}/artifact",
    "/v1/jobs?cursor=%00",
    "/v1/jobs?model=%00",
    "/v1/datasets?cursor=%01",
    "/v1/models?cursor=%00",
    "/v1/evaluations?cursor=%00",
]


def test_control_characters_and_huge_numbers_in_paths_and_queries_are_refused(hostile):
    client, _ = hostile
    for path in PATHS:
        refused(client.get(path))
    version = f"/v1/models/digits/versions/{INT4}"
    refused(client.head(f"{version}/artifact"))
    refused(client.delete(version))
    refused(client.post(f"{version}/promote", json={}))
    refused(client.post(f"{version}/reference", json={"dataset_id": "x"}))
    png = D.png_bytes(D.load()[1].of(3)[0])
    refused(client.post(f"{version}/predict", files={"image": ("a.png", png)}))
    refused(client.delete("/v1/datasets/%00"))
    refused(client.post("/v1/jobs/%00/cancel"))


def test_control_characters_and_huge_numbers_in_bodies_are_refused(hostile):
    client, _ = hostile
    archive = D.zip_image_folder({"9": D.load()[1].of(9)[:3]})
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()["id"]
    bodies = [
        {"model": "digits", "dataset_id": dataset, "base_version": INT4},
        {"model": "digits", "dataset_id": dataset, "base_version": HUGE},
        {"model": "digits", "dataset_id": "x\x00"},
        {"model": "digits", "dataset_id": dataset, "new_labels": ["nine\x00"]},
        {"model": "digits", "dataset_id": dataset, "notify_url": "https://a.example/\x00"},
    ]
    for body in bodies:
        refused(client.post("/v1/jobs", json=body), 422)
    evaluations = [
        {"model": "digits", "versions": [1, INT4], "dataset_id": dataset},
        {"model": "digits", "versions": [HUGE], "dataset_id": dataset},
        {"model": "digits\x00", "versions": [1], "dataset_id": dataset},
    ]
    for body in evaluations:
        refused(client.post("/v1/evaluations", json=body), 422)
    refused(client.post("/v1/models/digits/versions/1/promote", json={"reason": "a\x00"}), 422)
    refused(client.post("/v1/models/digits/versions/1/reference", json={"dataset_id": "\x00"}))
    assert client.get("/v1/jobs").json()["items"] == []


def test_a_dataset_named_with_a_nul_is_refused_before_anything_is_stored(hostile):
    client, settings = hostile
    from core.storage import open_storage

    before = {key for key, _ in open_storage(settings).list_objects("")}
    archive = D.zip_image_folder({"9": D.load()[1].of(9)[:3]})
    response = client.post(
        "/v1/datasets", data={"name": "nines\x00"}, files={"archive": ("d.zip", archive)}
    )
    refused(response, 422)
    assert {key for key, _ in open_storage(settings).list_objects("")} == before


def test_a_range_with_thousands_of_digits_is_a_416(hostile):
    client, _ = hostile
    url = "/v1/models/digits/versions/1/artifact"
    for method in (client.get, client.head):
        response = method(url, headers={"Range": f"bytes={'9' * 5000}-"})
        assert response.status_code == 416, response.text
