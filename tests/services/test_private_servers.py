"""The servers the service tests get are their own: not the machine's Redis or PostgreSQL, and
they can be stopped, killed and restarted without touching anything else. The machine's own
servers are only ever read here, never written."""

from __future__ import annotations

import secrets
from pathlib import Path

import psycopg
import pytest
import redis

from devkit.services import PostgresCluster, RedisServer, ServiceUnavailable, unavailable

pytestmark = pytest.mark.services
SHARED_REDIS = ("127.0.0.1", 6379)
SHARED_POSTGRES = ("127.0.0.1", 5432)


def own_redis(folder: Path, appendonly: bool = False) -> RedisServer:
    try:
        return RedisServer(folder, appendonly=appendonly)
    except ServiceUnavailable as exc:
        unavailable("Redis", exc)


def shared_redis_get(key: str, db: int) -> bytes | None:
    """GET ``key`` on the machine's own Redis (None too if there is none)."""
    host, port = SHARED_REDIS
    try:
        with redis.Redis(host=host, port=port, db=db, socket_connect_timeout=2) as shared:
            return shared.get(key)
    except redis.exceptions.RedisError:
        return None


def test_the_private_redis_is_not_the_shared_one(redis_server: RedisServer, redis_url: str):
    assert redis_server.port != SHARED_REDIS[1]
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    key, value = f"graft-private-{secrets.token_hex(8)}", secrets.token_hex(8).encode()
    with redis.Redis.from_url(redis_url) as private:
        assert private.dbsize() == 0  # a fresh server: nothing of any other test's
        private.set(key, value)
        assert private.get(key) == value
    assert all(shared_redis_get(key, db) is None for db in (0, 9))


def test_a_redis_server_keeps_its_port_and_its_append_only_file_across_restarts(tmp_path):
    key = f"graft-private-{secrets.token_hex(8)}"
    with own_redis(tmp_path / "aof", appendonly=True) as server:
        port = server.port
        with redis.Redis.from_url(server.url) as client:
            client.set(key, "kept")
        server.restart()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get(key) == b"kept"
    assert not server.running

    with own_redis(tmp_path / "plain") as server:
        with redis.Redis.from_url(server.url) as client:
            client.set(key, "lost")
        server.kill()
        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get(key) is None  # without the append-only file it forgets everything


def rows(url: str) -> list[int]:
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM kept ORDER BY n")]


def test_a_restarted_cluster_keeps_its_port_and_its_rows(pg_cluster: PostgresCluster):
    assert pg_cluster.port != SHARED_POSTGRES[1]
    url = pg_cluster.create_database()
    name = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
            conn.execute("CREATE TABLE kept (n integer)")
            conn.execute("INSERT INTO kept SELECT generate_series(1, 100)")
        port = pg_cluster.port
        pg_cluster.stop()
        with pytest.raises(psycopg.OperationalError):
            rows(url)
        pg_cluster.start()
        assert pg_cluster.port == port and rows(url) == list(range(1, 101))
        pg_cluster.stop(mode="immediate")  # a crash: the committed rows come back from the WAL
        pg_cluster.start()
        assert rows(url) == list(range(1, 101))
    finally:
        pg_cluster.start()
        pg_cluster.drop_database(url)
    try:
        with psycopg.connect(
            host=SHARED_POSTGRES[0], port=SHARED_POSTGRES[1], user="postgres", connect_timeout=2
        ) as shared:
            found = shared.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            assert found.fetchone() is None  # the database was only ever on the private cluster
    except psycopg.OperationalError:
        pass  # no shared server to compare with


def test_a_cluster_of_its_own_starts_empty_and_cleans_up_after_itself():
    try:
        cluster = PostgresCluster()
    except ServiceUnavailable as exc:
        unavailable("PostgreSQL", exc)
    with cluster:
        root = cluster.root
        assert root.is_dir()
        url = cluster.create_database()
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
            names = {n for (n,) in conn.execute("SELECT datname FROM pg_database")}
        assert names == {"postgres", "template0", "template1", url.rsplit("/", 1)[1]}
    assert not root.exists()
