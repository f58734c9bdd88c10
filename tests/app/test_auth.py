"""API keys and tenants: a key sees only its owner's resources; others' ids answer 404."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth import create_key, revoke_key
from app.main import create_app
from core.db import session_scope
from core.migrate import db_upgrade
from core.models import ApiKey
from core.settings import Settings
from devkit.digits import digits_archive, register_digits


def new_key(settings: Settings, owner: str) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return create_key(session, owner)[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_once_a_key_exists_requests_without_one_are_401(client, settings):
    key = new_key(settings, "alice")
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/models", headers=bearer(key + "x")).status_code == 401
    assert client.get("/v1/models", headers=bearer("nonsense")).status_code == 401
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    bare = client.get("/v1/models", headers={"Authorization": key})  # no "Bearer "
    assert bare.status_code == 401 and "`Bearer <key>`" in bare.json()["detail"]
    assert "required" not in bare.json()["detail"]  # a key was sent: it is not missing
    assert client.get("/healthz").status_code == 200  # operations stay open
    with session_scope(settings.resolved_database_url) as session:
        stored = session.scalars(select(ApiKey)).one()
        assert key not in (stored.key_hash, stored.prefix)
        revoke_key(session, stored.prefix)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 401


def test_a_server_bound_beyond_loopback_requires_keys(tmp_path):
    exposed = Settings(data_dir=tmp_path, host="0.0.0.0", sweep_interval_s=0)
    db_upgrade(exposed)
    with TestClient(create_app(exposed)) as c:
        response = c.get("/v1/models")
    assert response.status_code == 401 and "graft keys create" in response.json()["detail"]


def test_another_owners_resources_are_invisible(client, settings, base_weights, digit_splits):
    alice, bob = new_key(settings, "alice"), new_key(settings, "bob")
    client.headers.update(bearer(alice))
    assert register_digits(client, base_weights).status_code == 201
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()
    image = io.BytesIO()
    digit_splits[1].of(1)[0].save(image, format="PNG")

    client.headers.update(bearer(bob))
    for method, path in [
        ("GET", "/v1/models/digits"),
        ("GET", "/v1/models/digits/versions/1"),
        ("GET", "/v1/models/digits/versions/1/artifact"),
        ("GET", f"/v1/datasets/{dataset['id']}"),
        ("DELETE", f"/v1/datasets/{dataset['id']}"),
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
    ]:
        assert client.request(method, path).status_code == 404, (method, path)
    predict = client.post(
        "/v1/models/digits/versions/1/predict",
        files=[("image", ("1.png", image.getvalue(), "image/png"))],
    )
    assert predict.status_code == 404
    assert client.get("/v1/models").json()["items"] == []
    assert client.get("/v1/datasets").json()["items"] == []
    assert client.get("/v1/jobs").json()["items"] == []
    submitted = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    assert submitted.status_code == 422  # bob has no model "digits" and cannot see the dataset

    # Names are per owner: bob may have a "digits" of his own.
    assert register_digits(client, base_weights).status_code == 201
    client.headers.update(bearer(alice))
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


@pytest.mark.parametrize("owner", ["", "x" * 65])
def test_owner_names_are_checked(settings, owner):
    with pytest.raises(ValueError), session_scope(settings.resolved_database_url) as session:
        create_key(session, owner)


def test_graft_keys_create_prints_a_working_key_once(client, settings):
    import os
    import subprocess
    import sys

    env = {**os.environ, "GRAFT_DATA_DIR": str(settings.data_dir), "GRAFT_LOG_LEVEL": "WARNING"}
    run = subprocess.run(
        [sys.executable, "-m", "graft.cli", "keys", "create", "--owner", "carol"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = run.stdout.strip()
    assert key.startswith("graft_") and "cannot be shown again" in run.stderr
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    listed = subprocess.run(
        [sys.executable, "-m", "graft.cli", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "carol" in listed and key not in listed
