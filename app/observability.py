"""Prometheus metrics: HTTP latency, and jobs by status read from the database at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import session_scope
from app.models import Job, JobStatus

DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, float("inf"))


class JobsCollector(Collector):
    """Read from the database at scrape time, so every API replica reports the same numbers
    whichever worker ran the jobs."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with session_scope(self.database_url) as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            finished = session.execute(
                select(Job.started_at, Job.finished_at, Job.metrics)
                .where(Job.status == JobStatus.SUCCEEDED)
                .order_by(Job.finished_at.desc())
            ).all()
        gauge = GaugeMetricFamily("graft_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            gauge.add_metric([status.value], counts.get(status.value, 0))
        yield gauge
        yield GaugeMetricFamily(
            "graft_queue_depth",
            "Jobs waiting for a worker",
            value=counts.get(JobStatus.QUEUED.value, 0),
        )
        durations = [(end - start).total_seconds() for start, end, _ in finished if start and end]
        buckets = [
            ("+Inf" if b == float("inf") else str(b), sum(d <= b for d in durations))
            for b in DURATION_BUCKETS
        ]
        yield HistogramMetricFamily(
            "graft_job_duration_seconds",
            "Run time of succeeded jobs (their last attempt)",
            buckets=buckets,
            sum_value=sum(durations),
        )
        rates = [
            m["timing"]["images_per_s"]
            for _, _, m in finished[:20]
            if m and m.get("timing", {}).get("images_per_s")
        ]
        yield GaugeMetricFamily(
            "graft_images_per_second",
            "Feature-extraction throughput, mean of the last 20 jobs",
            value=sum(rates) / len(rates) if rates else 0.0,
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
