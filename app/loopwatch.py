"""Tell the API's stalls from the machine's: a thread that pings the event loop.

Every ``every_s`` a thread asks the event loop to answer (``call_soon_threadsafe``) and times
how long the answer takes. A loop that answers late was either running something that does not
give it back (a handler that blocks: the stall is the API's) or not given the CPU at all (the
machine is full: the stall is the machine's). The thread tells the two apart by looking at what
the loop thread is doing once the answer is ``warn_after_s`` late: inside the loop's selector
means it was waiting to be scheduled; anywhere else names the code that blocked it. Every lag
goes into ``graft_event_loop_lag_seconds``; each stall over ``warn_after_s`` is logged once,
with where it was.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from pathlib import Path

from prometheus_client import Histogram

log = logging.getLogger(__name__)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OURS = tuple(str(Path(__file__).resolve().parents[1] / p) for p in ("app", "worker", "graft"))
_WAITING = ("selectors.py", "base_events.py")  # where an idle loop sits: select(), _run_once


def where(frames: traceback.StackSummary) -> str:
    """The innermost frame of Graft's own code (else the innermost of all), as
    ``file:line in function``; or "waiting to be scheduled" when the loop sat in its selector."""
    if not frames:
        return "unknown"
    innermost = frames[-1]
    if Path(innermost.filename).name in _WAITING and innermost.name in ("select", "poll"):
        return "waiting to be scheduled (the machine is busy, not the API)"
    ours = [f for f in frames if f.filename.startswith(_OURS) and f.filename != __file__]
    frame = ours[-1] if ours else innermost
    short = (
        Path(frame.filename).name
        if not ours
        else Path(frame.filename).relative_to(Path(__file__).resolve().parents[1])
    )
    return f"{short}:{frame.lineno} in {frame.name}"


class LoopWatch:
    """Start it in the running loop (``LoopWatch(histogram).start()``); ``stop()`` at shutdown."""

    def __init__(
        self, histogram: Histogram, every_s: float = 0.1, warn_after_s: float = 0.5
    ) -> None:
        self.histogram, self.every_s, self.warn_after_s = histogram, every_s, warn_after_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalls: list[tuple[float, str]] = []  # (seconds, where), the last 100

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._watch,
            args=(loop, threading.get_ident()),
            name="graft-loopwatch",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        while not self._stopped.wait(self.every_s):
            answered = threading.Event()
            started = time.perf_counter()
            try:
                loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop closed
                return
            stalled_in = None
            if not answered.wait(self.warn_after_s):
                frame = sys._current_frames().get(loop_thread)
                stalled_in = where(traceback.extract_stack(frame)) if frame else "unknown"
                while not answered.wait(1.0):
                    if self._stopped.is_set() or loop.is_closed():
                        return
            lag = time.perf_counter() - started
            self.histogram.observe(lag)
            if stalled_in is not None:
                self.stalls = [*self.stalls[-99:], (lag, stalled_in)]
                log.warning("the event loop answered after %.2f s: %s", lag, stalled_in)
