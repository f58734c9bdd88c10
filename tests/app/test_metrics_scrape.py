"""A /metrics scrape reads the same few rows however many jobs have ever succeeded."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest
from prometheus_client import generate_latest
from sqlalchemy import event

from app.observability import Metrics
from core.db import get_engine, session_scope, utcnow
from core.models import Dataset, Job, JobStatus, Model


class _RowsRead:
    count = 0


class _CountingCursor(sqlite3.Cursor):
    """A real SQLite cursor that counts the rows handed to SQLAlchemy."""

    def fetchone(self):
        row = super().fetchone()
        _RowsRead.count += row is not None
        return row

    def fetchmany(self, size: int | None = None):
        rows = super().fetchmany(size) if size is not None else super().fetchmany()
        _RowsRead.count += len(rows)
        return rows

    def fetchall(self):
        rows = super().fetchall()
        _RowsRead.count += len(rows)
        return rows


class _CountingConnection(sqlite3.Connection):
    def cursor(self, factory=_CountingCursor):  # type: ignore[override]
        return super().cursor(factory)


@pytest.fixture()
def counted(settings):
    """The settings' database, whose connections count every row read from here on."""
    engine = get_engine(settings.resolved_database_url)

    def counting(_dialect, _record, _cargs, cparams):
        cparams["factory"] = _CountingConnection

    event.listen(engine, "do_connect", counting)
    engine.dispose()  # connections made from now on count
    yield settings
    event.remove(engine, "do_connect", counting)
    engine.dispose()


def add_jobs(url: str, succeeded: int, start: int = 0) -> None:
    """``succeeded`` finished jobs: job i ran 5, 25 or 45 s and extracted i images per second;
    plus, the first time, one queued and one failed job."""
    now = utcnow()
    with session_scope(url) as session:
        model = session.get(Model, "M") or Model(id="M", owner="o", name="m", latest_version=1)
        dataset = session.get(Dataset, "D") or Dataset(
            id="D",
            owner="o",
            labels={"a": 1},
            num_images=1,
            rejected=[],
            sha256="0" * 64,
            storage_key="datasets/D/images.tar",
            size_bytes=1,
        )
        session.add_all([model, dataset])

        def job(status: JobStatus, **fields) -> Job:
            return Job(
                owner="o",
                model_id="M",
                base_version=1,
                dataset_id="D",
                new_labels=["b"],
                config={},
                progress={"stage": "done", "fraction": 1.0},
                status=status,
                **fields,
            )

        for i in range(start, start + succeeded):
            finished = now - timedelta(hours=1) + timedelta(seconds=i)
            ran = (5, 25, 45)[i % 3]
            # a real job's metrics are large: per-class figures, the confusion matrix, ...
            bulk = {"confusion_matrix": {"matrix": [[i] * 50] * 50}}
            metrics = {"timing": {"images_per_s": float(i)}, **bulk}
            session.add(
                job(
                    JobStatus.SUCCEEDED,
                    started_at=finished - timedelta(seconds=ran),
                    finished_at=finished,
                    metrics=metrics,
                )
            )
        if not start:
            session.add_all([job(JobStatus.QUEUED), job(JobStatus.FAILED, metrics={})])


def scrape(url: str) -> tuple[dict[str, float], int]:
    """The jobs' samples of one scrape, and how many rows it read."""
    before = _RowsRead.count
    text = generate_latest(Metrics(url).registry).decode()
    read = _RowsRead.count - before
    samples = {}
    for line in text.splitlines():
        if line.startswith(("graft_jobs", "graft_queue", "graft_job_", "graft_images")):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples, read


def expected(succeeded: int) -> dict[str, float]:
    runs = [(5, 25, 45)[i % 3] for i in range(succeeded)]
    last20 = list(range(succeeded))[-20:]
    return {
        'graft_jobs{status="succeeded"}': succeeded,
        'graft_jobs{status="queued"}': 1,
        'graft_jobs{status="failed"}': 1,
        'graft_jobs{status="running"}': 0,
        "graft_queue_depth": 1,
        'graft_job_duration_seconds_bucket{le="10"}': sum(r <= 10 for r in runs),
        'graft_job_duration_seconds_bucket{le="30"}': sum(r <= 30 for r in runs),
        'graft_job_duration_seconds_bucket{le="60"}': succeeded,
        'graft_job_duration_seconds_bucket{le="+Inf"}': succeeded,
        "graft_job_duration_seconds_count": succeeded,
        "graft_job_duration_seconds_sum": sum(runs),
        # job 0 extracted 0 images per second: no rate, left out of the mean
        "graft_images_per_second": sum(last20) / len([i for i in last20 if i]),
    }


def test_a_scrape_reads_as_many_rows_for_5_jobs_as_for_200(counted):
    url = counted.resolved_database_url
    add_jobs(url, 5)
    few, read_few = scrape(url)
    add_jobs(url, 195, start=5)
    many, read_many = scrape(url)

    assert read_many == read_few, f"{read_few} rows for 5 jobs, {read_many} for 200"
    for samples, succeeded in ((few, 5), (many, 200)):
        for name, value in expected(succeeded).items():
            assert samples[name] == pytest.approx(value), name
