"""Many clients at once: every poll is answered, the database pool is never the bottleneck, and
concurrent writes of one thing make one thing.

Requests go through the real ASGI app, its real thread pool and a real SQLite database; the
pool's connections are counted as they are checked out.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from sqlalchemy import event, update

from core.db import POOL_SIZE, get_engine, session_scope
from core.models import Job
from devkit.digits import digits_archive, register_digits

CLIENTS = 256


class PoolWatch:
    """The most connections the app's engine had checked out at once."""

    def __init__(self, url: str) -> None:
        self.engine = get_engine(url)
        self.now = self.peak = 0
        self._lock = threading.Lock()
        event.listen(self.engine, "checkout", self._out)
        event.listen(self.engine, "checkin", self._in)

    def _out(self, *_: object) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def _in(self, *_: object) -> None:
        with self._lock:
            self.now -= 1

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._out)
        event.remove(self.engine, "checkin", self._in)


@pytest.fixture()
def queued_job(client, model, digit_splits) -> str:
    archive = digits_archive(digit_splits[1], old_per_class=3)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    return job.json()["id"]  # no worker runs: it stays queued


@pytest.fixture()
def pool(settings):
    watch = PoolWatch(settings.resolved_database_url)
    yield watch
    watch.close()


def asgi_client(client) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=client.app), base_url="http://127.0.0.1", timeout=120
    )


def test_hundreds_of_concurrent_polls_are_all_answered(client, queued_job, pool):
    async def poll() -> list[int]:
        async with asgi_client(client) as http:
            paths = [f"/v1/jobs/{queued_job}", "/v1/jobs?limit=20", "/healthz"]
            responses = await asyncio.gather(
                *(http.get(paths[i % len(paths)]) for i in range(CLIENTS * 2))
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(poll())
    assert statuses == [200] * len(statuses)
    assert 0 < pool.peak <= POOL_SIZE  # requests wait for a slot, not for a connection


def test_open_event_streams_share_one_poller_and_hold_no_connection(client, queued_job, pool):
    watch = client.app.state.job_watch

    async def follow() -> tuple[list[str], list[int], int]:
        async with asgi_client(client) as http:
            streams = [
                asyncio.create_task(http.get(f"/v1/jobs/{queued_job}/events"))
                for _ in range(CLIENTS)
            ]
            while watch.following < CLIENTS:
                await asyncio.sleep(0.05)
            pool.peak = pool.now  # each stream's first read is done
            held = []  # connections in use, sampled over a few polls with every stream open
            for _ in range(int(watch.interval * 4 / 0.01)):
                held.append(pool.now)
                await asyncio.sleep(0.01)
            peak = pool.peak
            cancel = await http.post(f"/v1/jobs/{queued_job}/cancel")
            assert cancel.status_code == 202
            bodies = [(await s).text for s in streams]
        return bodies, held, peak

    bodies, held, peak = asyncio.run(follow())
    # between polls nothing is held; during one, the poller's query: not one per stream
    assert min(held) == 0 and peak <= 1
    for body in bodies:
        assert body.startswith("event: status\n") and '"status":"queued"' in body
        assert body.rstrip().endswith("}") and '"status":"cancelled"' in body.split("\n\n")[-2]
    assert watch.following == 0


def test_concurrent_submits_with_one_idempotency_key_make_one_job(client, queued_job):
    body = client.get(f"/v1/jobs/{queued_job}").json()
    request = {"model": "digits", "dataset_id": body["dataset_id"]}

    async def submit() -> list[httpx.Response]:
        async with asgi_client(client) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/jobs", json=request, headers={"Idempotency-Key": "k"})
                    for _ in range(30)
                )
            )

    responses = asyncio.run(submit())
    ids = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(ids) == 1 and queued_job not in ids
    for r in responses:
        assert r.status_code == 202 or (r.status_code == 409 and r.headers["Retry-After"] == "1")
    assert len(client.get("/v1/jobs").json()["items"]) == 2


def test_concurrent_registrations_of_one_name_make_one_model_and_leave_no_file(
    client, settings, base_weights
):
    async def register() -> list[httpx.Response]:
        data = {
            "name": "twins",
            "architecture": "timm:resnet18",
            "labels": '["0","1","2","3","4","5","6","7","8"]',
        }
        weights = base_weights.read_bytes()
        async with asgi_client(client) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/models", data=data, files={"weights": ("w.safetensors", weights)}
                    )
                    for _ in range(4)
                )
            )

    statuses = sorted(r.status_code for r in asyncio.run(register()))
    assert statuses == [201, 409, 409, 409]
    stored = [p for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()]
    # the winner's files (one version's, in every format); the others' were never kept
    assert len({p.parent for p in stored}) == 1
    assert sorted(p.name for p in stored) == [
        "model.onnx",
        "model.safetensors",
        "model.torchscript.pt",
    ]


def test_repeated_polls_within_the_window_are_answered_from_memory(
    settings, base_weights, digit_splits
):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.test_auth import bearer, new_key

    cached = settings.model_copy(update={"poll_cache_s": 3.0})
    with TestClient(create_app(cached)) as client:
        key = new_key(cached, "alice")
        headers = bearer(key)
        assert register_digits(client, base_weights, headers=headers).status_code == 201
        archive = digits_archive(digit_splits[1], old_per_class=3)
        dataset = client.post(
            "/v1/datasets", files={"archive": ("d.zip", archive)}, headers=headers
        ).json()
        job_id = client.post(
            "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}, headers=headers
        ).json()["id"]
        watch = PoolWatch(cached.resolved_database_url)
        try:
            first = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            used = watch.peak
            watch.peak = watch.now
            again = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            assert again == first and used >= 1 and watch.peak == 0  # no connection at all
            # another owner's key never gets the remembered answer
            other = bearer(new_key(cached, "bob"))
            assert client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
            # a change through the API shows at once; one behind its back within the window
            cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).json()
            assert client.get(f"/v1/jobs/{job_id}", headers=headers).json() == cancelled
            with session_scope(cached.resolved_database_url) as s:
                s.execute(update(Job).where(Job.id == job_id).values(warnings=["changed"]))
            stale = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            assert stale["warnings"] == cancelled["warnings"]  # within the window
            time.sleep(3.5)  # the window passes
            assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["warnings"] == [
                "changed"
            ]
        finally:
            watch.close()
