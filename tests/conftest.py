"""Shared fixtures: real digits scans, a real classifier trained on them, a real database.

The web stack (FastAPI, SQLAlchemy, settings) is imported inside the fixtures that need it, so
that the engine's tests run where only the ML stack is installed (a GPU machine's image:
bench/gpu.sh)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import safetensors.torch

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.data import scan_image_folder
from engine.expand import ExpansionConfig, ExpansionRequest

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from core.settings import Settings
    from devkit.services import PostgresCluster


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test that shows a row of the README's failure table says which (bench/faults.py)."""
    for mark in item.iter_markers("fault"):
        item.user_properties.append(("fault", mark.args[0]))


@pytest.fixture()
def observed(request: pytest.FixtureRequest):
    """``observed("started 1.2 s after Redis returned")``: what a fault test saw, for the
    table bench/faults.py prints."""
    return lambda text: request.node.user_properties.append(("observed", text))


def digits_request(
    weights: Path,
    root: Path,
    config: ExpansionConfig | None = None,
    new_labels: tuple[str, ...] = ("9",),
) -> ExpansionRequest:
    """Teach the base model (0-8) ``new_labels`` from the image folder ``root``."""
    images = scan_image_folder(root)
    labels = [str(d) for d in OLD]
    return ExpansionRequest(
        ARCH, labels, weights, D.PREP, images, list(new_labels), config or ExpansionConfig()
    )


@pytest.fixture(scope="session")
def digit_splits() -> tuple[D.Digits, D.Digits]:
    return D.load()


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory: pytest.TempPathFactory, digit_splits) -> Path:
    """A resnet18 trained from scratch on digits 0-8 (about 99% held-out accuracy)."""
    base, _ = digit_splits
    model = D.train_base(base, OLD, ARCH)
    path = tmp_path_factory.mktemp("base") / "digits.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)
    )
    return path


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database at the head migration, made once; each test gets a copy."""
    from core.migrate import db_upgrade
    from core.settings import Settings

    s = Settings(data_dir=tmp_path_factory.mktemp("template"))
    db_upgrade(s)
    return s.data_dir / "graft.db"


@pytest.fixture()
def settings(tmp_path: Path, migrated_sqlite: Path) -> Settings:
    # poll_cache_s=0: tests read right after writing behind the API's back (tests/app/test_load.py
    # covers the cache itself)
    from core.settings import Settings

    s = Settings(data_dir=tmp_path / "var", sweep_interval_s=0, job_lease_s=30, poll_cache_s=0)
    s.ensure_dirs()
    shutil.copyfile(migrated_sqlite, s.data_dir / "graft.db")
    return s


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster for the whole session; tests may stop and restart it."""
    from devkit.services import PostgresCluster, ServiceUnavailable, unavailable

    try:
        cluster = PostgresCluster()
    except ServiceUnavailable as exc:
        unavailable("PostgreSQL", exc)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture()
def postgres_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """A fresh, empty database on the private cluster, dropped afterwards."""
    pg_cluster.start()  # in case a test before this one left it stopped
    url = pg_cluster.create_database()
    yield url
    from core.db import get_engine

    get_engine(url).dispose()
    pg_cluster.start()
    pg_cluster.drop_database(url)
