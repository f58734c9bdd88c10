"""Datasets registered by reference: images already in S3 (a real moto server on loopback),
copied in by the API in the background, checked like uploads, usable by jobs once ready."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from botocore.config import Config
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.datasets import load_digits

from app.importer import Importer
from app.main import create_app
from core.migrate import db_upgrade
from core.settings import Settings
from devkit.digits import register_digits
from tests.core.test_storage import moto_server
from tests.support.processes import start_api
from worker import pipeline

BUCKET, OTHER = "graft-images", "graft-private"
DIGITS = 1200  # more than one page (1000 keys) of S3's listing
SETTLE_S = 600  # a guard against a hang, not a speed requirement


def png(pixels: np.ndarray, size: int = 16) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L")
    image.resize((size, size), Image.Resampling.BILINEAR).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server holding ``digits/<label>/<n>.png``: 1200 scans of sklearn's digits
    over 10 labels; and a bucket the server is not allowed to import from."""
    with moto_server(tmp_path_factory.mktemp("moto")) as (endpoint, _):
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(max_pool_connections=16),
        )
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=OTHER)
        raw = load_digits()
        counts: Counter[str] = Counter()

        def put(i: int) -> None:
            j = i % len(raw.target)
            key = f"digits/{raw.target[j]}/{i:05d}.png"
            client.put_object(Bucket=BUCKET, Key=key, Body=png(raw.images[j], 16 + i // 1797))

        for i in range(DIGITS):
            counts[str(raw.target[i % len(raw.target)])] += 1
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(DIGITS)))
        client.put_object(Bucket=OTHER, Key="secret/0/a.png", Body=png(raw.images[0]))
        yield endpoint, client, dict(sorted(counts.items()))


def import_settings(tmp_path: Path, endpoint: str, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "var",
        "sweep_interval_s": 0,
        "poll_cache_s": 0,
        "s3_endpoint_url": endpoint,
        "import_buckets": f"{BUCKET},other-allowed",
    }
    settings = Settings(**{**values, **overrides})
    db_upgrade(settings)
    return settings


@pytest.fixture()
def importing(tmp_path, s3):
    settings = import_settings(tmp_path, s3[0])
    with TestClient(create_app(settings)) as client:
        yield client, settings


def settle(client, dataset_id: str) -> dict:
    """The dataset once its import has ended."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        dataset = client.get(f"/v1/datasets/{dataset_id}").json()
        if dataset["status"] != "importing":
            return dataset
        time.sleep(0.2)
    pytest.fail(f"the import of {dataset_id} did not end: {dataset}")


def idle(client) -> None:
    """Wait until the API's importer has nothing running (its last import has cleaned up)."""
    deadline = time.monotonic() + SETTLE_S
    while client.app.state.importer.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.app.state.importer.running


def files_under(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith("graft.db")
    )


def stored_members(settings: Settings, dataset: dict) -> list[str]:
    tars = list((settings.data_dir / "artifacts/datasets" / dataset["id"]).glob("*.tar"))
    assert len(tars) == 1, tars
    with tarfile.open(tars[0]) as tar:
        return tar.getnames()


def assert_problem(response, status: int, says: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert says in response.json()["detail"], response.json()


def test_a_prefix_of_more_than_a_listing_page_of_images_becomes_a_ready_dataset(importing, s3):
    client, settings = importing
    response = client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/digits/"})
    assert response.status_code == 202, response.text
    registered = response.json()
    assert registered["status"] == "importing" and registered["sha256"] is None
    assert registered["source"] == {"kind": "prefix", "uri": f"s3://{BUCKET}/digits/"}
    assert set(registered["progress"]) == {"fraction", "done", "total", "message"}
    assert response.headers["location"] == f"/v1/datasets/{registered['id']}"

    dataset = settle(client, registered["id"])
    assert dataset["status"] == "ready", dataset
    assert dataset["labels"] == s3[2] and dataset["num_images"] == DIGITS
    assert dataset["rejected"] == [] and dataset["error"] is None
    assert len(dataset["sha256"]) == 64
    assert dataset["progress"]["fraction"] == 1.0 and dataset["progress"]["done"] == DIGITS
    members = stored_members(settings, dataset)
    assert len(members) == len(set(members)) == DIGITS
    assert Counter(m.split("/")[0] for m in members) == Counter(s3[2])
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [dataset["id"]]
    idle(client)
    assert not list(settings.tmp_dir.iterdir())


def test_a_manifest_registers_the_images_it_lists(importing, s3):
    client, _ = importing
    endpoint, s3_client, _ = s3

    def keys(prefix: str, n: int) -> list[str]:
        listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, MaxKeys=n)
        return [o["Key"] for o in listed["Contents"]]

    lines = ["uri,label"]
    threes, sevens = keys("digits/3/", 30), keys("digits/7/", 3)
    lines += [f"s3://{BUCKET}/{key},three" for key in threes]
    lines += [f's3://{BUCKET}/{key},"seven, sort of"' for key in sevens]
    lines += [f"s3://{BUCKET}/{threes[0]},three"] * 30  # copied once, not 31 times
    lines += [f"s3://{BUCKET}/{sevens[0]},three"]  # which is it? not imported
    lines += [
        f"s3://{OTHER}/secret/0/a.png,zero",
        f"s3://{BUCKET}/digits/../digits/3/00003.png,three",
        f"s3://{BUCKET}/digits/3/missing.png,three",
        "not a line",
    ]
    s3_client.put_object(Bucket=BUCKET, Key="lists/some.csv", Body="\n".join(lines).encode())

    response = client.post(
        "/v1/datasets", json={"manifest": f"s3://{BUCKET}/lists/some.csv", "name": "listed"}
    )
    assert response.status_code == 202, response.text
    dataset = settle(client, response.json()["id"])
    assert dataset["status"] == "ready" and dataset["name"] == "listed"
    assert dataset["labels"] == {"seven, sort of": 2, "three": 30}
    reasons = {r["path"]: r["reason"] for r in dataset["rejected"]}
    assert reasons[f"s3://{BUCKET}/{threes[0]}"] == "listed again: copied once"
    assert "2 labels (seven, sort of, three)" in reasons[f"s3://{BUCKET}/{sevens[0]}"]
    del reasons[f"s3://{BUCKET}/{threes[0]}"], reasons[f"s3://{BUCKET}/{sevens[0]}"]
    assert "not one this server imports from" in reasons[f"s3://{OTHER}/secret/0/a.png"]
    assert "'..'" in reasons[f"s3://{BUCKET}/digits/../digits/3/00003.png"]
    assert reasons[f"s3://{BUCKET}/digits/3/missing.png"] == "no such object"
    assert reasons["not a line"] == "expected a line `uri,label`"
    assert len(reasons) == 4


def test_corrupt_files_and_non_images_are_reported_like_uploads(importing, s3):
    client, settings = importing
    _, s3_client, _ = s3
    good = png(load_digits().images[5])
    for key, body in {
        "mixed/five/a.png": good,
        "mixed/five/b.png": good[: len(good) // 2],
        "mixed/five/notes.txt": b"not an image",
        "mixed/five/.DS_Store": b"\x00",
        "mixed/loose.png": good,
        "mixed/six/c.png": png(load_digits().images[6]),
    }.items():
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=body)

    response = client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/mixed"})
    dataset = settle(client, response.json()["id"])
    assert dataset["status"] == "ready" and dataset["labels"] == {"five": 1, "six": 1}
    reasons = {r["path"]: r["reason"] for r in dataset["rejected"]}
    assert set(reasons) == {"mixed/five/b.png", "mixed/five/notes.txt", "mixed/loose.png"}
    assert reasons["mixed/five/b.png"].startswith("not a decodable image")
    assert reasons["mixed/five/notes.txt"].startswith("not an image in an accepted format")
    assert reasons["mixed/loose.png"] == "not inside a label folder"
    assert sorted(stored_members(settings, dataset)) == ["five/000001.png", "six/000001.png"]

    # nothing usable at all: the import fails, saying why
    s3_client.put_object(Bucket=BUCKET, Key="junk/a/notes.txt", Body=b"text")
    failed = settle(
        client, client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/junk/"}).json()["id"]
    )
    assert failed["status"] == "failed" and failed["error"]["code"] == "no_images"
    assert "junk/a/notes.txt" in failed["error"]["message"]


def test_the_limits_of_uploads_apply_to_imports(tmp_path, s3):
    _, s3_client, _ = s3
    good = png(load_digits().images[1], 24)
    s3_client.put_object(Bucket=BUCKET, Key="limits/one/a.png", Body=good)
    s3_client.put_object(Bucket=BUCKET, Key="limits/one/big.png", Body=good + b"\0" * 4000)
    lines = "".join(f"s3://{BUCKET}/limits/one/a.png,one\n" for _ in range(60))
    s3_client.put_object(Bucket=BUCKET, Key="lists/long.csv", Body=lines.encode())
    settings = import_settings(tmp_path, s3[0], max_archive_members=20, max_member_bytes=2000)
    with TestClient(create_app(settings)) as client:
        small = settle(
            client,
            client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/limits/"}).json()["id"],
        )
        assert small["labels"] == {"one": 1}
        assert small["rejected"] == [
            {"path": "limits/one/big.png", "reason": "file larger than the per-file limit"}
        ]
        many = client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/digits/"})
        failed = settle(client, many.json()["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "too_many_files"
        assert "more than 20" in failed["error"]["message"]
        long = client.post("/v1/datasets", json={"manifest": f"s3://{BUCKET}/lists/long.csv"})
        assert settle(client, long.json()["id"])["error"]["code"] == "too_many_files"

    tiny = import_settings(tmp_path / "tiny", s3[0], max_archive_members=1)
    with TestClient(create_app(tiny)) as client:
        refused = client.post("/v1/datasets", json={"manifest": f"s3://{BUCKET}/lists/long.csv"})
        assert_problem(refused, 413, "the manifest is larger than")
        assert client.get("/v1/datasets").json()["items"] == []


def test_a_bucket_not_allowed_is_refused_and_nothing_is_stored(importing, tmp_path, s3):
    client, settings = importing
    refused = client.post("/v1/datasets", json={"source": f"s3://{OTHER}/secret/"})
    assert_problem(refused, 403, "not one this server imports from")
    refused = client.post("/v1/datasets", json={"manifest": f"s3://{OTHER}/secret/0/a.png"})
    assert_problem(refused, 403, "GRAFT_IMPORT_BUCKETS")
    assert client.get("/v1/datasets").json()["items"] == []
    assert files_under(settings.data_dir) == []

    off = import_settings(tmp_path / "off", s3[0], import_buckets="")
    with TestClient(create_app(off)) as plain:
        response = plain.post("/v1/datasets", json={"source": f"s3://{BUCKET}/digits/"})
        assert_problem(response, 403, "set GRAFT_IMPORT_BUCKETS")
        assert plain.get("/v1/datasets").json()["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"source": f"s3://{BUCKET}/digits/../../{OTHER}/"}, "source"),
        ({"source": f"s3://{BUCKET}/digits/%2E%2E/x/"}, "source"),
        ({"source": f"s3://{BUCKET}//digits/"}, "source"),
        ({"source": f"https://{BUCKET}/digits/"}, "source"),
        ({"source": "s3://Graft_Images/digits/"}, "source"),
        ({"manifest": f"s3://{BUCKET}/lists/"}, "manifest"),
        ({"manifest": f"s3://{BUCKET}/digits/3/missing.csv"}, "manifest"),
        ({"source": f"s3://{BUCKET}/nothing-here/"}, "source"),
    ],
)
def test_malformed_or_missing_addresses_are_refused(importing, body, field):
    client, settings = importing
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
    assert files_under(settings.data_dir) == []


def test_a_request_names_exactly_one_reference(importing):
    client, _ = importing
    both = {"source": f"s3://{BUCKET}/digits/", "manifest": f"s3://{BUCKET}/a.csv"}
    assert client.post("/v1/datasets", json=both).status_code == 422
    assert client.post("/v1/datasets", json={}).status_code == 422
    assert (
        client.post(
            "/v1/datasets", content=b"{", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/v1/datasets", data={"name": "x"}).status_code == 422  # no archive


def test_an_imported_dataset_is_used_only_once_ready_and_trains_a_job(tmp_path, s3, base_weights):
    settings = import_settings(tmp_path, s3[0])
    with TestClient(create_app(settings)) as client:
        client.app.state.importer.stop()  # nothing copies it yet
        assert register_digits(client, base_weights).status_code == 201
        registered = client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/digits/"}).json()
        job = {"model": "digits", "dataset_id": registered["id"], "config": {"epochs": 3}}
        assert_problem(client.post("/v1/jobs", json=job), 409, "still importing")
        reference = client.post(
            "/v1/models/digits/versions/1/reference", json={"dataset_id": registered["id"]}
        )
        assert_problem(reference, 409, "still importing")

        importer = Importer(settings)
        importer.start()
        try:
            assert settle(client, registered["id"])["status"] == "ready"
        finally:
            importer.stop()
        submitted = client.post("/v1/jobs", json=job)
        assert submitted.status_code == 202, submitted.text
        assert submitted.json()["new_labels"] == ["9"]
        pipeline.run_job(submitted.json()["id"], settings)
        finished = client.get(f"/v1/jobs/{submitted.json()['id']}").json()
        assert finished["status"] == "succeeded", finished["error"]
        assert client.get("/v1/models/digits/versions/2").json()["labels"][-1] == "9"


def test_deleting_an_import_midway_leaves_nothing_behind(tmp_path, s3):
    settings = import_settings(tmp_path, s3[0], import_threads=1)
    with TestClient(create_app(settings)) as client:
        registered = client.post("/v1/datasets", json={"source": f"s3://{BUCKET}/digits/"}).json()
        while (d := client.get(f"/v1/datasets/{registered['id']}").json())["progress"]["done"] < 20:
            assert d["status"] == "importing"
            time.sleep(0.05)
        assert client.delete(f"/v1/datasets/{registered['id']}").status_code == 204
        assert client.get(f"/v1/datasets/{registered['id']}").status_code == 404
        idle(client)
        assert files_under(settings.data_dir) == []
        assert client.get("/v1/datasets").json()["items"] == []


def test_an_import_whose_api_was_killed_is_taken_over_and_completes_once(tmp_path, s3):
    data = tmp_path / "var"
    data.mkdir()
    env = {
        "GRAFT_IMPORT_BUCKETS": BUCKET,
        "GRAFT_S3_ENDPOINT_URL": s3[0],
        "GRAFT_IMPORT_LEASE_S": "3",
        "GRAFT_IMPORT_THREADS": "1",
    }
    first, port = start_api(data, **env)
    try:
        url = f"http://127.0.0.1:{port}/v1/datasets"
        registered = httpx.post(url, json={"source": f"s3://{BUCKET}/digits/"}).json()
        while (d := httpx.get(f"{url}/{registered['id']}").json())["progress"]["done"] < 50:
            assert d["status"] == "importing"
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert list((data / "tmp").glob(f"import-{registered['id']}-*"))  # its copy, cut short

    second, port = start_api(data, **{**env, "GRAFT_IMPORT_THREADS": "16"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            dataset = settle(client, registered["id"])
    finally:
        second.terminate()
        second.wait()
    assert dataset["status"] == "ready" and dataset["num_images"] == DIGITS
    assert dataset["labels"] == s3[2]
    settings = Settings(data_dir=data)
    members = stored_members(settings, dataset)
    assert len(members) == len(set(members)) == DIGITS
    assert not list((data / "tmp").glob("import-*"))
