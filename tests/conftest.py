"""Shared fixtures: real digits scans, a real classifier trained on them, a real database.

The web stack (FastAPI, SQLAlchemy, settings) is imported inside the fixtures that need it, so
that the engine's tests run where only the ML stack is installed (a GPU machine's image:
bench/gpu.sh)."""

from __future__ import annotations

import os

# Under `make test` two test processes share the machine's cores (pytest-xdist): each computes
# on one thread, and so do the servers and workers it starts (OpenMP threads beyond the cores
# spin against each other). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import safetensors.torch
from filelock import FileLock

from devkit import digits as D
from devkit.digits import ARCH, OLD, SMALL_ARCH
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


def trained_once(tmp_path_factory: pytest.TempPathFactory, name: str, train) -> Path:
    """``train()``'s model saved as ``name``, once per run: under pytest-xdist the first process
    that needs it trains it, the others wait for it (and do not train their own)."""
    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # the run's folder, above each process's own
    path = run / "base" / name
    path.parent.mkdir(exist_ok=True)
    with FileLock(f"{path}.lock"):
        if not path.exists():
            model = train()
            partial = path.with_suffix(".partial")
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, str(partial)
            )
            partial.replace(path)
    return path


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory: pytest.TempPathFactory, digit_splits) -> Path:
    """A resnet18 trained from scratch on digits 0-8 (about 99% held-out accuracy), once per
    run (about 40 s)."""
    return trained_once(
        tmp_path_factory, "digits.safetensors", lambda: D.train_base(digit_splits[0], OLD, ARCH)
    )


@pytest.fixture(scope="session")
def small_base_weights(tmp_path_factory: pytest.TempPathFactory, digit_splits) -> Path:
    """A resnet10t trained on digits 0-8: for tests that store many versions and look at how
    jobs run, not at what they learn (the crash and fault tests' clusters)."""
    return trained_once(
        tmp_path_factory,
        "digits-small.safetensors",
        lambda: D.train_base(digit_splits[0], OLD, SMALL_ARCH),
    )


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database at the head migration, made once; each test gets a copy."""
    from core.migrate import db_upgrade
    from core.settings import Settings

    s = Settings(data_dir=tmp_path_factory.mktemp("template"))
    db_upgrade(s)
    return s.data_dir / "graft.db"


def _settings(data_dir: Path) -> Settings:
    # poll_cache_s=0: tests read right after writing behind the API's back (tests/app/test_load.py
    # covers the cache itself)
    from core.settings import Settings

    return Settings(data_dir=data_dir, sweep_interval_s=0, job_lease_s=30, poll_cache_s=0)


# A test that asks for one of these fixtures starts from a copy of the data folder where it was
# made once for the session (tests/support/templates.py), the first one asked for winning.
TEMPLATES = {"grown_model": "grown_folder", "model": "registered_folder"}
TEMPLATE_FOLDERS: list[Path] = []  # made so far; removed once the last test using them is done
LAST_TEMPLATE_USER = pytest.StashKey[int]()
POSITION = pytest.StashKey[dict[str, int]]()


def _uses_template(item: pytest.Item) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in TEMPLATES)


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [i for i, item in enumerate(session.items) if _uses_template(item)]
    session.stash[LAST_TEMPLATE_USER] = users[-1] if users else -1
    session.stash[POSITION] = {item.nodeid: i for i, item in enumerate(session.items)}


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The template folders go once a test at or past the last one (in collection order) that
    copies them is done (the suite's temporary files are a budget: the docs walkthrough, later,
    needs 1 GB of its own). Under pytest-xdist every process collects the whole suite and is
    handed test modules in that order, so none is handed a template's user after this."""
    position = item.session.stash[POSITION].get(item.nodeid, -1)
    if TEMPLATE_FOLDERS and position >= item.session.stash[LAST_TEMPLATE_USER]:
        for folder in TEMPLATE_FOLDERS:
            shutil.rmtree(folder, ignore_errors=True)
        TEMPLATE_FOLDERS.clear()


@pytest.fixture()
def settings(tmp_path: Path, migrated_sqlite: Path, request: pytest.FixtureRequest) -> Settings:
    from tests.support.templates import copy_data_folder

    s = _settings(tmp_path / "var")
    wanted = next((t for name, t in TEMPLATES.items() if name in request.fixturenames), None)
    if wanted:
        copy_data_folder(request.getfixturevalue(wanted)[0], s.data_dir)
    s.ensure_dirs()
    if not wanted:
        shutil.copyfile(migrated_sqlite, s.data_dir / "graft.db")
    return s


@pytest.fixture(scope="session")
def registered_folder(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path, base_weights: Path
) -> tuple[Path, dict]:
    """A data folder where the digits model (0-8) was registered through the API, and the
    API's answer."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.support.templates import freeze

    s = _settings(tmp_path_factory.mktemp("registered") / "var")
    s.ensure_dirs()
    shutil.copyfile(migrated_sqlite, s.data_dir / "graft.db")
    with TestClient(create_app(s)) as c:
        response = D.register_digits(c, base_weights)
        assert response.status_code == 201, response.text
    TEMPLATE_FOLDERS.append(s.data_dir)
    return freeze(s), response.json()


@pytest.fixture(scope="session")
def grown_folder(
    tmp_path_factory: pytest.TempPathFactory, registered_folder, digit_splits
) -> tuple[Path, dict]:
    """A data folder with digits v1 (0-8, registered) and v2 (0-9, grown by a job on 20 held-out
    scans of each old digit and 10 nines), and that job."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.support.templates import copy_data_folder, freeze
    from worker import pipeline

    s = _settings(tmp_path_factory.mktemp("grown") / "var")
    copy_data_folder(registered_folder[0], s.data_dir)
    archive = D.digits_archive(digit_splits[1], old_per_class=20, new_shots=10)
    with TestClient(create_app(s)) as c:
        train = c.post("/v1/datasets", files={"archive": ("train.zip", archive)}).json()
        job = c.post("/v1/jobs", json={"model": "digits", "dataset_id": train["id"]}).json()
        pipeline.run_job(job["id"], s)
        job = c.get(f"/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded" and job["result"]["version"] == 2, job
    TEMPLATE_FOLDERS.append(s.data_dir)
    return freeze(s), job


@pytest.fixture()
def model(settings: Settings, registered_folder) -> dict:
    """The digits model (0-8) as registered through the API (its answer): version 1, in this
    test's data folder."""
    return registered_folder[1]


@pytest.fixture()
def grown_model(settings: Settings, grown_folder) -> dict:
    """The digits model with version 2 (0-9) grown from version 1 by a job (that job), in this
    test's data folder."""
    return grown_folder[1]


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
