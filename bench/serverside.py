"""What the API says of itself, read from its /metrics between two moments: its own latency by
route (the time from the request reaching the app to its answer) and how late its event loop
answered. Set next to what a client saw, it tells an API that stalled (server time and loop lag
grow with the client's) from a machine that was full (the client waited, the server did not).

Prometheus histograms keep counts per bucket, so a percentile is known only up to its bucket:
"p99 <= 25 ms" reads "99 % of answers took at most 25 ms"; the max is the upper end of the
highest bucket that received anything.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout_s: float = 30.0) -> Sample | None:
    """Every sample of ``url`` (a /metrics page), keyed by name and sorted labels; None when it
    cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@dataclass(frozen=True)
class Spread:
    """A histogram's change between two scrapes."""

    count: int
    p50_s: float | None  # upper end of the bucket holding the 50th percentile
    p99_s: float | None
    max_s: float | None  # upper end of the highest bucket that received anything (inf: over all)
    last_finite_ms: float = 0.0  # the highest finite bucket, for "over" when max_s is inf

    def ms(self, which: str) -> str:
        value = getattr(self, f"{which}_s")
        if value is None:
            return "-"
        return f">{self.last_finite_ms:.0f}" if math.isinf(value) else f"<={value * 1e3:g}"


def spread(before: Sample, after: Sample, name: str, **labels: str) -> Spread:
    """The histogram ``name`` (its ``_bucket`` samples matching ``labels``) between two
    scrapes; with no ``labels``, every series summed."""
    buckets: dict[float, float] = {}
    for (sample, keys), value in after.items():
        if sample != f"{name}_bucket":
            continue
        given = dict(keys)
        if any(given.get(k) != v for k, v in labels.items()):
            continue
        bound = float(given["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value - before.get((sample, keys), 0.0)
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0.0)
    finite = [b for b in bounds if not math.isinf(b)]
    last = finite[-1] * 1e3 if finite else 0.0
    if total <= 0:
        return Spread(0, None, None, None, last)

    def quantile(q: float) -> float:
        return next(b for b in bounds if buckets[b] >= q * total)

    return Spread(int(total), quantile(0.5), quantile(0.99), quantile(1.0), last)


def server_latency(before: Sample, after: Sample, route: str, method: str = "GET") -> Spread:
    return spread(before, after, "graft_http_request_duration_seconds", method=method, route=route)


def loop_lag(before: Sample, after: Sample) -> Spread:
    return spread(before, after, "graft_event_loop_lag_seconds")


def count_5xx(before: Sample, after: Sample) -> int:
    def total(sample: Sample) -> float:
        return sum(
            v
            for (name, keys), v in sample.items()
            if name == "graft_http_requests_total" and dict(keys).get("status", "").startswith("5")
        )

    return int(total(after) - total(before))
