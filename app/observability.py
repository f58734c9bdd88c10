"""Prometheus metrics: HTTP latency, and jobs by status read from the database at scrape time."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Float, Select, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.loopwatch import LAG_BUCKETS
from core.db import session_scope
from core.models import Job, JobStatus

DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))
RECENT_JOBS = 20  # graft_images_per_second is the mean of this many last succeeded jobs


class seconds_between(FunctionElement):  # noqa: N801 (used like a SQL function)
    """``seconds_between(start, end)``: ``end - start`` in seconds, computed by the database."""

    type = Float()
    inherit_cache = True
    name = "seconds_between"


@compiles(seconds_between)
def _seconds_between(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end} - {start}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(c, **kw) for c in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


@dataclass(frozen=True)
class Durations:
    """The histogram of succeeded jobs' run times: cumulative (le, count) buckets, and the
    sum of all run times."""

    buckets: list[tuple[str, float]]
    total_s: float


def _durations(session: Session) -> Durations:
    """One row of sums, however many jobs have succeeded."""
    seconds = seconds_between(Job.started_at, Job.finished_at)
    finite = [b for b in DURATION_BUCKETS if not math.isinf(b)]
    count, total, *within = session.execute(
        select(
            func.count(),
            func.sum(seconds),
            *(func.sum(case((seconds <= b, 1), else_=0)) for b in finite),
        ).where(
            Job.status == JobStatus.SUCCEEDED,
            Job.started_at.is_not(None),
            Job.finished_at.is_not(None),
        )
    ).one()
    buckets = [(str(b), float(n or 0)) for b, n in zip(finite, within, strict=True)]
    return Durations([*buckets, ("+Inf", float(count))], float(total or 0.0))


def _mean_recent_rate() -> Select:
    """The mean images per second of the last RECENT_JOBS succeeded jobs that recorded one
    (read from the metrics in the database, not loaded with them)."""
    rate = Job.metrics[("timing", "images_per_s")].as_float().label("rate")
    recent = (
        select(rate)
        .where(Job.status == JobStatus.SUCCEEDED, Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(RECENT_JOBS)
        .subquery()
    )
    return select(func.avg(recent.c.rate)).where(recent.c.rate > 0)


class JobsCollector(Collector):
    """Read from the database at scrape time, so every API replica reports the same numbers
    whichever worker ran the jobs. The database does the sums: a scrape reads a handful of
    rows however many jobs have ever run."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with session_scope(self.database_url) as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            durations = _durations(session)
            rate = session.scalar(_mean_recent_rate())
        gauge = GaugeMetricFamily("graft_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            gauge.add_metric([status.value], counts.get(status.value, 0))
        yield gauge
        yield GaugeMetricFamily(
            "graft_queue_depth",
            "Jobs waiting for a worker",
            value=counts.get(JobStatus.QUEUED.value, 0),
        )
        yield HistogramMetricFamily(
            "graft_job_duration_seconds",
            "Run time of succeeded jobs (their last attempt)",
            buckets=durations.buckets,
            sum_value=durations.total_s,
        )
        yield GaugeMetricFamily(
            "graft_images_per_second",
            f"Feature-extraction throughput, mean of the last {RECENT_JOBS} jobs",
            value=float(rate or 0.0),
        )


class Metrics:
    def __init__(self, database_url: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "graft_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "graft_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "graft_event_loop_lag_seconds",
            "How late the API's event loop answered a ping sent every 0.1 s (a stall over 0.5 s "
            "is logged with where the loop was)",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(JobsCollector(database_url))


class MetricsMiddleware:
    """Counts requests by route template (not raw path, so ids do not explode the labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
