"""The production compose stack, for real: the two Graft images (built by tests/docker/build.sh),
PostgreSQL, Redis and an S3 server in containers, driven through the API's published port as a
user would. Runs under `make test-docker` (GRAFT_TEST_DOCKER=1); skipped by plain `make test`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors

from devkit.digits import OLD, digits_archive, register_digits
from devkit.net import free_port
from tests.support.cluster import SLOW

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("GRAFT_TEST_DOCKER") != "1",
        reason="the container run: `make test-docker` (builds the images first)",
    ),
]
ROOT = Path(__file__).resolve().parents[2]
PROJECT = "graft-ci"
FINAL = {"succeeded", "failed", "cancelled"}


class Stack:
    """`docker-compose -f docker-compose.yml -f tests/docker/compose.test.yml` as project
    graft-ci, the API on a free host port."""

    def __init__(self) -> None:
        tag = os.environ.get("GRAFT_IMAGE_TAG", "ci")
        self.api_port = free_port()
        self.env = {
            **os.environ,
            "GRAFT_API_IMAGE": f"graft-api:{tag}",
            "GRAFT_WORKER_IMAGE": f"graft-worker:{tag}",
            "GRAFT_API_PORT": str(self.api_port),
            "GRAFT_FLOWER_PORT": str(free_port()),
        }
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.flower_url = f"http://127.0.0.1:{self.env['GRAFT_FLOWER_PORT']}"

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        command = [
            "docker-compose",
            "-p",
            PROJECT,
            "-f",
            str(ROOT / "docker-compose.yml"),
            "-f",
            str(ROOT / "tests/docker/compose.test.yml"),
            *args,
        ]
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        pytest.fail("the API never became ready:\n" + self.compose("logs", check=False))

    def logs(self, service: str) -> list[str]:
        return self.compose("logs", "--no-color", "--no-log-prefix", service).splitlines()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack()
    stack.compose("down", "-v", "--remove-orphans", check=False)  # what a broken run left
    try:
        stack.compose("up", "-d", "--no-build")
        stack.wait_healthy()
        yield stack
    finally:
        print(stack.compose("ps", "-a", check=False))
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[httpx.Client]:
    """An API key made with `graft keys create` in the API container, and a client using it."""
    key = stack.compose("exec", "-T", "api", "graft", "keys", "create", "--owner", "ci").strip()
    assert key and "\n" not in key
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        yield client


def wait(client: httpx.Client, job_id: str, until: set[str], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout  # a safety net, many times the expected time
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in until:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def test_a_job_end_to_end_through_the_published_port(
    stack, api, base_weights, digit_splits, tmp_path
):
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401  # keys exist: one is needed
    assert httpx.get(f"{stack.flower_url}/healthcheck").text == "OK"
    listed = stack.compose("exec", "-T", "api", "graft", "keys", "list")
    assert " ci " in listed and "active" in listed

    assert register_digits(api, base_weights).status_code == 201
    _, held = digit_splits
    archive = digits_archive(held, old_per_class=30, new_shots=12)
    dataset = api.post("/v1/datasets", files={"archive": ("digits.zip", archive)}).json()
    submitted = api.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    assert submitted.status_code == 202, submitted.text
    job = wait(api, submitted.json()["id"], FINAL)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1 and job["result"]["version"] == 2

    download = api.get("/v1/models/digits/versions/2/artifact")
    assert download.status_code == 200
    path = tmp_path / "digits-v2.safetensors"
    path.write_bytes(download.content)
    assert download.headers["etag"].strip('"') == hashlib.sha256(download.content).hexdigest()
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["labels"]) == [str(d) for d in OLD] + ["9"]
    onnx = api.get("/v1/models/digits/versions/2/artifact?format=onnx")
    assert onnx.status_code == 200 and len(onnx.content) > 1000

    # the production log format: one JSON object per line, the worker's carrying the job id
    worker_lines = [json.loads(line) for line in stack.logs("worker") if line.strip()]
    assert any(line.get("job_id") == job["id"] for line in worker_lines)
    api_lines = [json.loads(line) for line in stack.logs("api") if line.strip()]
    assert any(line["logger"].startswith("uvicorn") for line in api_lines)
    # one job at a time per worker container: celery's solo pool, no forked pool processes
    top = subprocess.run(
        ["docker", "top", f"{PROJECT}-worker-1", "-o", "pid,args"], capture_output=True, text=True
    ).stdout
    assert sum("graft worker" in line for line in top.splitlines()) == 1, top


def test_a_worker_container_killed_mid_job_is_replaced_and_the_job_runs_once(stack, api):
    versions_before = len(api.get("/v1/models/digits").json()["versions"])
    dataset_id = api.get("/v1/datasets").json()["items"][0]["id"]
    body = {
        "model": "digits",
        "base_version": 1,
        "dataset_id": dataset_id,
        "config": {"gate": {"min_retention": 0}, **SLOW},
    }
    job_id = api.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 300
    while (job := api.get(f"/v1/jobs/{job_id}").json())["progress"]["stage"] not in (
        "extracting",
        "training",
    ):
        assert time.monotonic() < deadline and job["status"] not in FINAL, job
        time.sleep(0.2)
    subprocess.run(["docker", "kill", f"{PROJECT}-worker-1"], check=True, capture_output=True)
    stack.compose("up", "-d", "--no-build", "worker")  # the orchestrator's restart

    job = wait(api, job_id, FINAL)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    versions = api.get("/v1/models/digits").json()["versions"]
    assert len(versions) == versions_before + 1
