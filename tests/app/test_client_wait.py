"""``Client.wait(timeout=)`` gives up at its timeout whatever the event stream does, and the
API's stream says it is alive while nothing happens."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.deps import Database
from app.watch import JobWatch
from graft.client import Client, GraftError
from tests.app.test_report_threads import report

RUNNING = report(0).model_copy(update={"status": "running", "metrics": None, "result": None})


class _Api(BaseHTTPRequestHandler):
    """A job that stays running: ``/events`` sends its headers, then (``keepalive`` None)
    nothing at all, or only keep-alive comments."""

    keepalive: float | None = None
    closing: threading.Event

    def do_GET(self) -> None:  # noqa: N802
        if self.path.endswith("/events"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.flush()
            while not self.closing.wait(self.keepalive):
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
            return
        body = RUNNING.model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=[None, 0.1], ids=["silent", "keep-alives only"])
def stalled_api(request) -> Iterator[str]:
    closing = threading.Event()
    handler = type("Handler", (_Api,), {"keepalive": request.param, "closing": closing})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    closing.set()
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_wait_gives_up_at_its_timeout_on_a_stream_that_never_delivers(stalled_api):
    outcome: list[BaseException] = []

    def follow() -> None:
        try:
            Client(stalled_api).wait(RUNNING.id, poll_interval=0.2, timeout=2)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            outcome.append(exc)

    waiter = threading.Thread(target=follow, daemon=True)
    waiter.start()
    waiter.join(30)  # a safety net, fifteen times the timeout
    assert not waiter.is_alive(), "wait(timeout=2) was still waiting after 30 s"
    assert len(outcome) == 1 and isinstance(outcome[0], GraftError), outcome
    assert f"job {RUNNING.id} did not finish within 2 s" in str(outcome[0])


@pytest.mark.timeout(60)
def test_the_api_stream_sends_keep_alives_while_nothing_changes(settings):
    """The client treats a stream silent for long as dead: the API's streams are never
    silent for long."""

    async def first_two() -> list[str]:
        watch = JobWatch(Database(settings.resolved_database_url), interval=0.05, keepalive=0.3)
        events = watch.events(RUNNING)
        try:
            return [await anext(events), await anext(events)]
        finally:
            await events.aclose()
            await watch.close()

    state, alive = asyncio.run(first_two())
    assert state.startswith("event: status\n") and json.loads(state.split("data: ")[1])
    assert alive == ": keep-alive\n\n"
