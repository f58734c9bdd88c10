"""Real PostgreSQL and Redis servers, private to the test run: a PostgreSQL cluster per session
(a fresh database per test; both in tests/conftest.py) and a Redis server per test, each on a
free loopback port. Without the server binaries these tests skip, unless
GRAFT_REQUIRE_SERVICES=1 (CI), where a missing service is a failure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.migrate import db_upgrade
from core.settings import Settings
from devkit.digits import SMALL_ARCH, digits_archive, register_digits
from devkit.services import RedisServer, ServiceUnavailable, unavailable
from tests.support.cluster import Cluster


@pytest.fixture()
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private, empty Redis server for this test alone; it may stop, kill or restart it."""
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except ServiceUnavailable as exc:
        unavailable("Redis", exc)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """The private Redis server's URL (database 0)."""
    return redis_server.url


@pytest.fixture()
def cluster(postgres_url, redis_url, tmp_path, small_base_weights, digit_splits, request):
    """API, sweep and workers on a private PostgreSQL and Redis; the digits model registered
    as a resnet10t (the ten-jobs test stores eleven versions: 0.7 GB, against 1.5 as a
    resnet18) and a dataset to grow it with."""
    env = {
        "GRAFT_DATABASE_URL": postgres_url,
        "GRAFT_BROKER_URL": redis_url,
        "GRAFT_DATA_DIR": str(tmp_path / "shared"),
        "GRAFT_JOB_LEASE_S": "3",
        "GRAFT_LOG_LEVEL": "INFO",
    }
    settings = Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        data_dir=tmp_path / "shared",
        job_lease_s=3,
        requeue_after_s=1,
        sweep_interval_s=0,
        poll_cache_s=0,  # the tests read right after a worker writes
    )
    db_upgrade(settings)
    c = Cluster(settings, env, tmp_path)
    registered = register_digits(c.client, small_base_weights, architecture=SMALL_ARCH)
    assert registered.status_code == 201, registered.text
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=10)
    c.dataset_id = c.client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()["id"]
    try:
        yield c
    finally:
        request.node.user_properties.append(("observed", c.close()))
    unexpected = c.pollers.unexpected()
    assert not unexpected, f"a fault answered pollers with {unexpected}"
