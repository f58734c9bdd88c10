"""`graft dataset push s3://…`: images already in a bucket, registered by reference through the
real `graft api` and a real S3 server (moto) on loopback, as a user types it."""

from __future__ import annotations

import subprocess

import boto3
import httpx
import pytest

from devkit import digits as D
from tests.core.test_storage import moto_server
from tests.support.cli import run_graft
from tests.support.processes import start_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api_with_bucket(tmp_path_factory, digit_splits):
    """`graft api` allowed to import from bucket "photos", which holds digits/<label>/*.png
    (three labels, 10 images each, and one file that is no image) and a manifest."""
    _, held = digit_splits
    with moto_server(tmp_path_factory.mktemp("moto")) as (endpoint, _):
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="photos")
        s3.create_bucket(Bucket="private")
        lines = ["uri,label"]
        for digit in (0, 1, 2):
            for i, image in enumerate(held.of(digit)[:10]):
                key = f"digits/{digit}/{i}.png"
                s3.put_object(Bucket="photos", Key=key, Body=D.png_bytes(image))
                lines.append(f"s3://photos/{key},{digit}")
        s3.put_object(Bucket="photos", Key="digits/2/notes.png", Body=b"not an image")
        s3.put_object(Bucket="photos", Key="lists/train.csv", Body="\n".join(lines).encode())
        data_dir = tmp_path_factory.mktemp("api")
        process, port = start_api(
            data_dir, GRAFT_IMPORT_BUCKETS="photos", GRAFT_S3_ENDPOINT_URL=endpoint
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.kill()
            process.wait(timeout=30)


def graft(url: str, *args: str) -> subprocess.CompletedProcess:
    return run_graft(url, *args, columns=120)


def test_a_bucket_prefix_is_pushed_by_reference_and_waited_for(api_with_bucket):
    pushed = graft(api_with_bucket, "dataset", "push", "s3://photos/digits/", "--name", "digits")
    assert pushed.returncode == 0, pushed.stderr
    assert "importing dataset" in pushed.stderr
    assert "skipped digits/2/notes.png" in pushed.stderr
    dataset_id = pushed.stdout.strip().splitlines()[-1]
    dataset = httpx.get(f"{api_with_bucket}/v1/datasets/{dataset_id}").json()
    assert dataset["status"] == "ready" and dataset["name"] == "digits"
    assert dataset["labels"] == {"0": 10, "1": 10, "2": 10}
    assert dataset["source"]["uri"] == "s3://photos/digits/"


def test_a_manifest_is_pushed_with_its_flag(api_with_bucket):
    pushed = graft(api_with_bucket, "dataset", "push", "s3://photos/lists/train.csv", "--manifest")
    assert pushed.returncode == 0, pushed.stderr
    dataset_id = pushed.stdout.strip().splitlines()[-1]
    dataset = httpx.get(f"{api_with_bucket}/v1/datasets/{dataset_id}").json()
    assert dataset["labels"] == {"0": 10, "1": 10, "2": 10} and dataset["rejected"] == []


def test_what_cannot_be_imported_is_refused_with_the_reason(api_with_bucket, tmp_path):
    private = graft(api_with_bucket, "dataset", "push", "s3://private/digits/")
    assert private.returncode == 3 and "GRAFT_IMPORT_BUCKETS" in private.stderr
    local = graft(api_with_bucket, "dataset", "push", str(tmp_path / "missing"), "--manifest")
    assert local.returncode == 2 and "--manifest takes an s3:// address" in local.stderr
    missing = graft(api_with_bucket, "dataset", "push", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    listed = httpx.get(f"{api_with_bucket}/v1/datasets").json()["items"]
    assert all(d["source"] is None or d["source"]["uri"].startswith("s3://photos/") for d in listed)
