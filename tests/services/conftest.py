"""Real PostgreSQL and Redis on this machine. Without them these tests skip, unless
GRAFT_REQUIRE_SERVICES=1 (CI), where a missing service is a failure."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

PG = os.environ.get("GRAFT_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS = os.environ.get("GRAFT_TEST_REDIS", "redis://127.0.0.1:6379")


def unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh, empty database, dropped afterwards."""
    import psycopg

    name = f"graft_test_{secrets.token_hex(4)}"
    admin = PG.replace("postgresql+psycopg", "postgresql") + "/test"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    yield f"{PG}/{name}"
    from app.db import get_engine

    get_engine(f"{PG}/{name}").dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """A Redis database of its own (index 9), emptied before and after."""
    import redis

    url = f"{REDIS}/9"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        unavailable("Redis", exc)
    yield url
    client.flushdb()
