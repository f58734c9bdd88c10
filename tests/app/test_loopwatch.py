"""The API tells its own stalls from the machine's: a blocked event loop is named where it
blocked, an idle one is "waiting to be scheduled", and every ping's lag is in /metrics."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

from prometheus_client import CollectorRegistry, Histogram

from app.loopwatch import LAG_BUCKETS, LoopWatch, where


def _histogram() -> Histogram:
    return Histogram("lag", "lag", buckets=LAG_BUCKETS, registry=CollectorRegistry())


def test_a_handler_that_blocks_the_loop_is_named_with_its_line():
    watch = LoopWatch(_histogram(), every_s=0.02, warn_after_s=0.1)

    async def handler_that_sleeps() -> None:
        time.sleep(0.6)  # blocks the loop, as a synchronous call in an async route would

    async def main() -> None:
        watch.start()
        await asyncio.sleep(0.1)
        await handler_that_sleeps()
        await asyncio.sleep(0.1)
        watch.stop()

    asyncio.run(main())
    assert watch.stalls, "the stall was not seen"
    lag, place = max(watch.stalls)
    assert lag >= 0.5
    assert "test_loopwatch.py" in place and "handler_that_sleeps" in place


def test_an_idle_loop_is_told_apart_as_waiting_to_be_scheduled():
    ready, done = threading.Event(), threading.Event()
    loop = asyncio.new_event_loop()

    def run() -> None:
        loop.call_soon(ready.set)
        loop.run_until_complete(_wait(done))

    async def _wait(event: threading.Event) -> None:
        while not event.is_set():
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10)
        time.sleep(0.02)  # into select()
        idle = None
        for _ in range(200):  # the loop wakes every 50 ms: catch it asleep
            frames = traceback.extract_stack(sys._current_frames()[thread.ident])
            if frames[-1].name in ("select", "poll"):
                idle = frames
                break
            time.sleep(0.003)
        assert idle is not None
        assert where(idle).startswith("waiting to be scheduled")
    finally:
        done.set()
        thread.join()
        loop.close()


def test_the_loop_lag_is_in_metrics(client):
    time.sleep(0.5)  # the watch pings every 0.1 s
    metrics = client.get("/metrics").text
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith("graft_event_loop_lag_seconds_count")
    )
    assert float(count.split()[1]) >= 1
