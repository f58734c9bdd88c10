"""One event under polling: clients poll the API back to back while something happens (a job
writes its version, a model with many files is deleted), and the longest wait any of them saw
is set next to the server's own latency and its event loop's lag over the same seconds.

A long client wait with a short server time and no loop lag is the machine's (the request
waited for a CPU); a long loop lag names the API (the log says where the loop was held).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from serverside import Spread, count_5xx, loop_lag, scrape, server_latency


@dataclass
class Event:
    label: str
    action_s: float = 0.0
    answers: int = 0
    longest_gap_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    errors_5xx: int | None = None
    server: Spread | None = None
    lag: Spread | None = None
    outcome: str = ""


class Pollers:
    """``n`` threads, each asking ``path`` over one kept-alive connection as fast as it is
    answered; the longest time between two answers of one poller, and what went wrong."""

    def __init__(self, base_url: str, path: str, n: int = 8) -> None:
        self.netloc, self.path = urlsplit(base_url).netloc, path
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.answers, self.longest_s = 0, 0.0
        self.errors: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(n)]

    def __enter__(self) -> Pollers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join()

    def _poll(self) -> None:
        connection = http.client.HTTPConnection(self.netloc, timeout=30)
        last = time.monotonic()
        while not self.halt.is_set():
            try:
                connection.request("GET", self.path)
                response = connection.getresponse()
                response.read()
                problem = None if response.status < 400 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                problem = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection(self.netloc, timeout=30)
            now = time.monotonic()
            with self.lock:
                self.answers += 1
                self.longest_s = max(self.longest_s, now - last)
                if problem:
                    self.errors[problem] = self.errors.get(problem, 0) + 1
            last = now
        connection.close()


def under_polling(
    base_url: str,
    label: str,
    action: Callable[[], str],
    poll_path: str = "/v1/jobs?limit=20",
    route: str = "/v1/jobs",
    settle_s: float = 1.0,
) -> Event:
    """Run ``action`` (it returns a line saying what it did) with pollers on ``poll_path``
    from ``settle_s`` before it to ``settle_s`` after."""
    event = Event(label)
    before = scrape(f"{base_url}/metrics")
    with Pollers(base_url, poll_path) as pollers:
        time.sleep(settle_s)
        started = time.monotonic()
        event.outcome = action()
        event.action_s = time.monotonic() - started
        time.sleep(settle_s)
    after = scrape(f"{base_url}/metrics")
    event.answers, event.errors = pollers.answers, pollers.errors
    event.longest_gap_ms = pollers.longest_s * 1e3
    if before is not None and after is not None:
        event.errors_5xx = count_5xx(before, after)
        event.server = server_latency(before, after, route)
        event.lag = loop_lag(before, after)
    return event
