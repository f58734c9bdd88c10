"""Artifact stores: a local folder and a real S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.migrate import db_upgrade
from core.settings import Settings
from core.storage import LocalStorage, S3Storage, open_storage
from devkit.digits import digits_archive, register_digits
from devkit.net import free_port
from worker import pipeline


@contextmanager
def moto_server(log_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto S3 server on a free loopback port with the bucket ``graft-test``: its endpoint
    and its process (which a test may stop early)."""
    port = free_port()
    log = (log_dir / "moto.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="graft", AWS_SECRET_ACCESS_KEY="graft-secret")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        for _ in range(100):
            try:
                client.create_bucket(Bucket="graft-test")
                break
            except Exception:
                time.sleep(0.1)
        yield endpoint, server
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as (endpoint, _):
        yield endpoint


def test_local_store_writes_atomically_and_keeps_keys_inside(tmp_path):
    store = LocalStorage(tmp_path / "store")
    source = tmp_path / "a.bin"
    source.write_bytes(b"hello" * 1000)
    stored = store.put_file("models/m/v/a.bin", source)
    assert stored.sha256 == hashlib.sha256(b"hello" * 1000).hexdigest()
    assert store.open("models/m/v/a.bin").read() == b"hello" * 1000
    assert [p.name for p in (tmp_path / "store/models/m/v").iterdir()] == ["a.bin"]
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.put_file(bad, source)


def test_s3_store_round_trip_with_verified_checksums(s3_endpoint, tmp_path):
    store = S3Storage("graft-test", "unit", tmp_path / "cache", s3_endpoint)
    source = tmp_path / "w.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024))
    stored = store.put_file("models/x/w.bin", source)
    assert store.exists("models/x/w.bin") and not store.exists("models/x/nope")
    assert store.open("models/x/w.bin").read() == source.read_bytes()
    local = store.local_path("models/x/w.bin")
    assert local.read_bytes() == source.read_bytes()
    assert hashlib.sha256(local.read_bytes()).hexdigest() == stored.sha256

    # An object whose bytes no longer match its recorded checksum is refused.
    store.client.put_object(
        Bucket="graft-test",
        Key="unit/models/x/bad.bin",
        Body=b"tampered",
        Metadata={"sha256": stored.sha256},
    )
    with pytest.raises(OSError, match="checksum mismatch"):
        store.local_path("models/x/bad.bin")
    assert not list((tmp_path / "cache/models/x").glob(".download-*"))

    store.delete("models/x/w.bin")
    assert not store.exists("models/x/w.bin") and not local.exists()


def test_a_job_keeps_every_artifact_in_s3(s3_endpoint, tmp_path, base_weights, digit_splits):
    settings = Settings(
        data_dir=tmp_path / "var",
        sweep_interval_s=0,
        storage_url="s3://graft-test/e2e",
        s3_endpoint_url=s3_endpoint,
    )
    db_upgrade(settings)
    with TestClient(create_app(settings)) as client:
        assert register_digits(client, base_weights).status_code == 201
        archive = digits_archive(digit_splits[1], old_per_class=20, new_shots=10)
        dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
        job = client.post(
            "/v1/jobs",
            json={"model": "digits", "dataset_id": dataset["id"], "config": {"epochs": 5}},
        ).json()
        pipeline.run_job(job["id"], settings)
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
        version = client.get("/v1/models/digits/versions/2").json()
        download = client.get("/v1/models/digits/versions/2/artifact")
        assert hashlib.sha256(download.content).hexdigest() == version["sha256"]
        assert download.headers["etag"] == f'"{version["sha256"]}"'
        onnx = client.get("/v1/models/digits/versions/2/artifact?format=onnx")
        assert onnx.status_code == 200 and len(onnx.content) > 1000
        assert version["formats"] == ["safetensors", "onnx", "torchscript"]
        assert_ranges_served_from_s3(client, download.content)

    keys = {
        o["Key"]
        for o in boto3.client(
            "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
        ).list_objects_v2(Bucket="graft-test", Prefix="e2e/")["Contents"]
    }
    images = {k for k in keys if "/reference/" in k}
    assert len(images) == 9 * 20 + 10  # v2's reference set: every image it learnt from, once
    others = sorted(k.rsplit("/", 1)[-1].split("-")[0] for k in keys - images)
    # dataset, v1 and v2 each as safetensors, onnx and torchscript, v2's reference manifest,
    # v2's lineage, the feature cache
    assert len(others) == 10 and others[-1] == "reference", others
    assert "lineage.safetensors" in others
    assert not (settings.data_dir / "artifacts").exists()
    assert isinstance(open_storage(settings), S3Storage)
    assert not list(Path(settings.tmp_dir).iterdir())


def assert_ranges_served_from_s3(client, whole: bytes) -> None:
    """HEAD and byte ranges of version 2's safetensors, read from the bucket by ranged GETs:
    a download resumed with Range gets the same bytes."""
    url, size = "/v1/models/digits/versions/2/artifact", len(whole)
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size and head.headers["accept-ranges"] == "bytes"
    assert head.headers["etag"] == f'"{hashlib.sha256(whole).hexdigest()}"'
    first = client.get(url, headers={"Range": f"bytes=0-{size // 3}"})
    assert first.status_code == 206 and first.content == whole[: size // 3 + 1]
    rest = client.get(
        url, headers={"Range": f"bytes={size // 3 + 1}-", "If-Range": head.headers["etag"]}
    )
    assert rest.status_code == 206 and rest.headers["content-range"].endswith(f"/{size}")
    assert first.content + rest.content == whole
    assert client.get(url, headers={"Range": "bytes=-10"}).content == whole[-10:]
    refused = client.get(url, headers={"Range": f"bytes={size}-"})
    assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}"


def test_the_s3_download_cache_keeps_to_its_bound(s3_endpoint, tmp_path):
    """Workers cache what they download; the cache stays under GRAFT_S3_CACHE_MB by dropping
    the least recently used files, which are downloaded again when next needed."""
    settings = Settings(
        data_dir=tmp_path / "var",
        storage_url="s3://graft-test/lru",
        s3_endpoint_url=s3_endpoint,
        s3_cache_mb=1,
    )
    store = open_storage(settings)
    cache = settings.data_dir.resolve() / "cache"
    blobs = {f"datasets/d{i}/images.tar": os.urandom(400 * 1024) for i in range(6)}
    for key, blob in blobs.items():
        source = tmp_path / "blob"
        source.write_bytes(blob)
        store.put_file(key, source)
    keys = list(blobs)

    def cached() -> dict[str, int]:
        return {
            p.relative_to(cache).as_posix(): p.stat().st_size
            for p in cache.rglob("*")
            if p.is_file()
        }

    assert store.local_path(keys[0]).read_bytes() == blobs[keys[0]]
    assert store.local_path(keys[1]).read_bytes() == blobs[keys[1]]
    assert store.local_path(keys[0]).read_bytes() == blobs[keys[0]]  # used again: now newest
    store.local_path(keys[2])  # 1.2 MiB: the least recently used goes
    assert set(cached()) == {keys[0], keys[2]}
    for key in keys[3:]:
        assert store.local_path(key).read_bytes() == blobs[key]
        assert sum(cached().values()) <= 1024 * 1024, cached()
    assert keys[-1] in cached()  # the most recently used stays
    assert keys[1] not in cached()
    assert store.local_path(keys[1]).read_bytes() == blobs[keys[1]]  # downloaded again
    assert sum(cached().values()) <= 1024 * 1024
