"""The API under polling load: throughput, latency and stalls, against a bare FastAPI app.

For each mode (embedded: SQLite and the file-system queue in a temporary GRAFT_DATA_DIR;
production: a fresh PostgreSQL database and a private Redis), Graft is started as a user starts
it: `graft db upgrade`, then `graft api` and one `graft worker`, as processes configured only by
GRAFT_* variables. A digits model is registered and a dataset uploaded over HTTP, and slow jobs
are submitted so that the worker is always training while the API is measured (`--quiet-machine`
starts no worker: the jobs stay queued and the machine is quiet).

  wrk     `wrk -t2 -cN -dSs --timeout 2s --latency` on GET /v1/jobs/{id} (a job of the model),
          the same for 20 jobs in turn (a Lua script), GET /v1/jobs?limit=20, and a bare
          FastAPI app (one `async def` route returning a job's JSON as a constant, served by
          uvicorn with the settings `graft api` uses),
          interleaved at each connection count. Per run: requests/s, the ratio to the bare app,
          p50/p99 latency, non-2xx answers, 5xx answers (from Graft's /metrics), socket errors
          and stalls (wrk timeouts: requests that took over 2 s, which its p99 leaves out).
          Meanwhile a side thread asks the server's /healthz once a second (a fresh
          connection, 2 s timeout) and samples its thread count and, in production, the
          database's connection count; the server's CPU use is its CPU time over the run.
          wrk is a closed loop: N connections wait about N / (requests/s) per answer, so an
          endpoint under N/2 requests/s must stall.
  SSE     256 streams of GET /v1/jobs/{id}/events on a running job, held 10 s: events per
          stream, streams that got an event, the API's threads before and during, PostgreSQL
          connections during, and a plain GET of the job issued while they are open.

  server  the API's own latency for the route (p99 and max from its /metrics histogram) and its
          event loop's lag (`graft_event_loop_lag_seconds`) over each run, next to the
          client's: a client p99 far above the server's, with no loop lag, is time spent
          waiting for a CPU, not in the API (`--pin` puts the API on a core of its own).
  events  8 pollers on GET /v1/jobs?limit=20 while a job writes its version (busy machine) and
          while the model, with every version the worker made, is deleted with force: the
          longest wait a poller saw, next to the server's time and the loop's lag.

Prints a markdown report with the goals: no stalls and no 5xx, at least half the bare app's
requests/s, p99 at most 50 ms on a quiet machine. Takes about 3.5 minutes at the defaults on a
2-core machine (about 3 with `--seconds 8`; the base model is trained once, for one epoch).
`.venv/bin/python bench/load.py [--mode embedded|production|both] [--seconds 10]
[--connections 64 256] [--quiet-machine] [--poll-cache-s 0]` (0: nothing is remembered;
requests for the same answer at the same moment still share one database read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serverside import Spread, count_5xx, loop_lag, scrape, server_latency
from stack import (
    PINS,
    Feeder,
    Graft,
    Postgres,
    cpu_seconds,
    free_port,
    pinned,
    private_redis,
    start,
    stop,
    tail,
    threads_of,
    train_base,
    wait_http,
)
from stalls import Event, under_polling

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STALL_S = 2.0
GOALS = "no stalls and no 5xx; at least 0.5x the bare app's requests/s; p99 <= 50 ms quiet"


def serve_bare(port: int, body_path: Path) -> None:
    """The baseline: one `async def` route returning a constant job JSON, served by uvicorn
    with the settings of `graft api` (graft.server.run_api) and its logging (graft.cli)."""
    import logging

    import uvicorn
    from fastapi import FastAPI

    from core.settings import Settings

    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    body = json.loads(body_path.read_text())
    app = FastAPI()

    @app.get("/job", response_model=None)
    async def job() -> dict:
        return body

    @app.get("/healthz", response_model=None)
    async def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(
        app,
        host=settings.host,
        port=port,
        log_level=settings.log_level.lower(),
        log_config=None,
        proxy_headers=True,
    )


# Measuring ----------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    connections: int
    requests_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    bytes_per_response: float | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    stalls: int = 0
    errors_5xx: int | None = None
    health_bad: int = 0
    health_max_ms: float = 0.0
    threads_max: int | None = None
    cpu_percent: float | None = None
    pg_max: int | None = None
    ratio: float | None = None
    server: Spread | None = None  # the API's own latency for the route (its /metrics)
    lag: Spread | None = None  # how late the API's event loop answered its pings


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_wrk(text: str, run: Run) -> None:
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        run.requests_per_s = float(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        ms = float(value) * UNITS[unit]
        if pct == "50":
            run.p50_ms = ms
        else:
            run.p99_ms = ms
    if m := re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB) read", text):
        done = int(m.group(1))
        run.bytes_per_response = float(m.group(2)) * SIZES[m.group(3)] / done if done else None
        if not done:
            run.p50_ms = run.p99_ms = None  # wrk prints 0 for an empty distribution
    if m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        run.socket_errors = sum(int(m.group(i)) for i in (1, 2, 3))
        run.stalls = int(m.group(4))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        run.non_2xx = int(m.group(1))


class Monitor(threading.Thread):
    """During a run: /healthz once a second on a fresh connection (over 2 s or failed: bad),
    the server's thread count, and the database's connection count."""

    def __init__(self, health_url: str, pid: int, pg: Postgres | None) -> None:
        super().__init__(name="monitor", daemon=True)
        self.health_url, self.pid, self.pg = health_url, pid, pg
        self.halt = threading.Event()
        self.bad, self.max_ms = 0, 0.0
        self.threads: list[int] = []
        self.pg_counts: list[int] = []
        self.cpu_start, self.started = cpu_seconds(pid), time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.health_url, timeout=STALL_S) as response:
                    response.read()
                    ok = response.status == 200
            except (OSError, urllib.error.URLError):
                ok = False
            elapsed = time.monotonic() - started
            self.max_ms = max(self.max_ms, elapsed * 1e3)
            self.bad += not ok or elapsed > STALL_S
            self.sample()
            self.halt.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def sample(self) -> None:
        if (threads := threads_of(self.pid)) is not None:
            self.threads.append(threads)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg_counts.append(self.pg.connections())

    def finish(self, run: Run) -> None:
        self.halt.set()
        self.join()
        cpu = cpu_seconds(self.pid)
        if cpu is not None and self.cpu_start is not None:
            run.cpu_percent = 100 * (cpu - self.cpu_start) / (time.monotonic() - self.started)
        run.health_bad, run.health_max_ms = self.bad, self.max_ms
        run.threads_max = max(self.threads, default=None)
        run.pg_max = max(self.pg_counts, default=None)


def wrk(
    url: str,
    run: Run,
    seconds: int,
    health_url: str,
    pid: int,
    pg: Postgres | None,
    route: str | None,
    script: Path | None = None,
) -> Run:
    metrics_url = health_url.replace("/healthz", "/metrics")
    before = scrape(metrics_url) if route else None
    monitor = Monitor(health_url, pid, pg)
    monitor.start()
    threads = f"-t{min(2, run.connections)}"  # wrk wants a connection per thread at least
    argv = [
        *pinned("load"),
        "wrk",
        threads,
        f"-c{run.connections}",
        f"-d{seconds}s",
        "--timeout",
        "2s",
        "--latency",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    try:
        done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60)
    finally:
        monitor.finish(run)
    if done.returncode:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    parse_wrk(done.stdout, run)
    after = scrape(metrics_url) if route else None
    if route and before is not None and after is not None:
        run.errors_5xx = count_5xx(before, after)
        run.server = server_latency(before, after, route)
        run.lag = loop_lag(before, after)
    time.sleep(1.0)  # let the server close the connections before the next run
    return run


@dataclass
class Streams:
    job_status: str
    streams: int
    hold_s: float
    events: list[int] = field(default_factory=list)
    first_event_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    threads_before: int | None = None
    threads_during: int | None = None
    pg_during: int | None = None
    probe_status: str = "-"
    probe_ms: float | None = None


def hold_streams(graft: Graft, job_id: str, n: int, hold_s: float, pg: Postgres | None) -> Streams:
    import httpx

    result = Streams(graft.job(job_id)["status"], n, hold_s, events=[0] * n)
    result.threads_before = threads_of(graft.api.pid)
    threads: list[int] = []
    pg_counts: list[int] = []
    halt = threading.Event()

    def sample() -> None:
        while not halt.wait(0.5):
            if (count := threads_of(graft.api.pid)) is not None:
                threads.append(count)
            if pg is not None:
                with contextlib.suppress(Exception):
                    pg_counts.append(pg.connections())

    def probe() -> None:  # a plain read while the streams are open
        if halt.wait(hold_s / 2):
            return
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"{graft.url}/v1/jobs/{job_id}", timeout=30) as response:
                response.read()
                result.probe_status = str(response.status)
        except urllib.error.HTTPError as exc:
            result.probe_status = str(exc.code)
        except (OSError, urllib.error.URLError) as exc:
            result.probe_status = type(exc).__name__
        result.probe_ms = (time.monotonic() - started) * 1e3

    async def main() -> None:
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
        timeout = httpx.Timeout(30.0, read=hold_s + 30)
        started = time.monotonic()

        async def one(i: int, client: httpx.AsyncClient) -> None:
            try:
                async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    if response.status_code != 200:
                        key = f"HTTP {response.status_code}"
                        result.failures[key] = result.failures.get(key, 0) + 1
                        return
                    async for line in response.aiter_lines():
                        if line.startswith("event:"):
                            if not result.events[i]:
                                result.first_event_s.append(time.monotonic() - started)
                            result.events[i] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                key = type(exc).__name__
                result.failures[key] = result.failures.get(key, 0) + 1

        async with httpx.AsyncClient(base_url=graft.url, limits=limits, timeout=timeout) as client:
            tasks = [asyncio.create_task(one(i, client)) for i in range(n)]
            await asyncio.sleep(hold_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    helpers = [threading.Thread(target=sample, daemon=True), threading.Thread(target=probe)]
    for helper in helpers:
        helper.start()
    try:
        asyncio.run(main())
    finally:
        halt.set()
        for helper in helpers:
            helper.join()
    result.threads_during = max(threads, default=None)
    result.pg_during = max(pg_counts, default=None)
    return result


# One mode -----------------------------------------------------------------------------------


@dataclass
class Mode:
    name: str
    runs: list[Run] = field(default_factory=list)
    streams: Streams | None = None
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def measure_mode(
    name: str, args: argparse.Namespace, weights: Path, held: Any, scratch: Path
) -> Mode:
    mode = Mode(name)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    env = {"GRAFT_DATA_DIR": str(folder / "var")}
    if args.poll_cache_s is not None:
        env["GRAFT_POLL_CACHE_S"] = str(args.poll_cache_s)
    with contextlib.ExitStack() as stack:
        pg = None
        if name == "production":
            pg = Postgres(stack)
            env["GRAFT_DATABASE_URL"] = pg.url
            env["GRAFT_BROKER_URL"] = private_redis(stack, folder)
        try:
            graft = Graft(stack, env, folder)
            graft.upload(weights, held, args.images_per_label)
            for _ in range(args.jobs):  # a full first page for GET /v1/jobs?limit=20
                graft.submit(args.views)
            job_id, feeder = graft.jobs[0], None
            if not args.quiet_machine:
                graft.start_worker(stack)
                job_id = graft.running_job(timeout_s=180) or job_id
                feeder = Feeder(graft, args.views)
                feeder.start()
                stack.callback(feeder.halt.set)
            body = folder / "job.json"
            body.write_text(graft.http.get(f"/v1/jobs/{job_id}").text)
            mode.notes.append(
                f"polled job: {graft.job(job_id)['status']} at the start, "
                f"{len(body.read_bytes())} bytes of JSON (the bare app returns a copy)"
            )
            bare_port = free_port()
            bare_log = folder / "bare.log"
            script = str(Path(__file__).resolve())
            bare = start(
                [*pinned("api"), sys.executable, script, "--serve-bare", str(bare_port), str(body)],
                {},
                bare_log,
            )
            stack.callback(stop, bare)
            bare_url = f"http://127.0.0.1:{bare_port}"
            wait_http(f"{bare_url}/healthz", bare, bare_log)

            targets = [
                ("bare", f"{bare_url}/job", f"{bare_url}/healthz", bare.pid, None, None),
                (
                    "GET /v1/jobs/{id}",
                    f"{graft.url}/v1/jobs/{job_id}",
                    f"{graft.url}/healthz",
                    graft.api.pid,
                    pg,
                    "/v1/jobs/{job_id}",
                ),
                (
                    "GET /v1/jobs?limit=20",
                    f"{graft.url}/v1/jobs?limit=20",
                    f"{graft.url}/healthz",
                    graft.api.pid,
                    pg,
                    "/v1/jobs",
                ),
            ]
            # every job of the first page in turn: polls of different jobs, fewer shared answers
            rotate = folder / "rotate.lua"
            paths = ", ".join(f'"/v1/jobs/{j}"' for j in graft.jobs[:20])
            rotate.write_text(
                f"local paths = {{{paths}}}\nlocal i = 0\n"
                "request = function()\n  i = i % #paths + 1\n"
                '  return wrk.format("GET", paths[i])\nend\n'
            )
            targets.insert(
                2,
                (
                    f"GET /v1/jobs/{{id}}, {min(20, len(graft.jobs))} jobs in turn",
                    graft.url,
                    f"{graft.url}/healthz",
                    graft.api.pid,
                    pg,
                    "/v1/jobs/{job_id}",
                ),
            )
            for connections in args.connections:
                bare_rps = None
                for target, url, health, pid, db, route in targets:
                    print(f"  {name}: {target}, {connections} connections", flush=True)
                    script = rotate if "in turn" in target else None
                    run = wrk(
                        url,
                        Run(target, connections),
                        args.seconds,
                        health,
                        pid,
                        db,
                        route,
                        script,
                    )
                    if target == "bare":
                        bare_rps = run.requests_per_s
                    elif bare_rps:
                        run.ratio = run.requests_per_s / bare_rps
                    mode.runs.append(run)

            stream_job = job_id
            if not args.quiet_machine:
                stream_job = graft.running_job(timeout_s=120) or job_id
            print(f"  {name}: {args.sse_streams} event streams", flush=True)
            mode.streams = hold_streams(graft, stream_job, args.sse_streams, args.sse_seconds, pg)
            if graft.worker is not None:
                succeeded = graft.count("succeeded")
                mode.notes.append(
                    f"worker: {succeeded} jobs succeeded during the mode, "
                    f"{graft.count('failed')} failed; the model has "
                    f"{len(graft.http.get('/v1/models/digits').json()['versions'])} versions"
                )
                if feeder is not None and feeder.error:
                    mode.notes.append(f"job feeder, last error: {feeder.error}")
                if graft.worker.poll() is not None:
                    mode.notes.append(f"the worker exited ({graft.worker.returncode})")
            if feeder is not None:
                print(f"  {name}: a job writes its version, under polling", flush=True)
                mode.events.append(
                    under_polling(graft.url, "a job writes its version", graft.next_success)
                )
                feeder.halt.set()
            print(f"  {name}: the model deleted with force, under polling", flush=True)
            mode.events.append(
                under_polling(graft.url, "the model deleted with force", graft.delete_model)
            )
            if graft.api.poll() is not None:
                mode.notes.append(f"the API exited ({graft.api.returncode})")
            logged = graft.api_log.read_text(errors="replace").splitlines()
            problems = [line for line in logged if " ERROR " in line or "Traceback" in line]
            held = [line.split(" ", 4)[-1] for line in logged if "event loop answered" in line]
            mode.notes.append(
                f"event-loop stalls over 0.5 s in the API's log: {len(held)}"
                + (f"; e.g. {'; '.join(held[:3])}" if held else "")
            )
            if problems:
                mode.notes.append(f"API log: {len(problems)} ERROR lines; first: {problems[0]}")
        except Exception:
            for log in sorted(folder.glob("*.log")):
                print(f"--- {log.name}\n{tail(log)}", file=sys.stderr)
            raise
    mode.seconds = time.monotonic() - started
    return mode


# Report -------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def spread_ms(spread: Spread | None) -> str:
    return "-" if spread is None else f"{spread.ms('p99')} / {spread.ms('max')}"


def report(modes: list[Mode], args: argparse.Namespace, load_before: tuple, took: float) -> None:
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    cache = "" if args.poll_cache_s is None else f", GRAFT_POLL_CACHE_S={args.poll_cache_s:g}"
    machine = "quiet machine" if args.quiet_machine else "busy"
    print(f"# Graft API under polling load ({machine}{cache})")
    print()
    loads = ", ".join(f"{x:.2f}" for x in load_before)
    print(
        f"Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), load average "
        f"before start {loads}, at the end {load_after}; wrk -t2 -d{args.seconds}s --timeout 2s; "
        f"{'no worker, jobs queued' if args.quiet_machine else 'one worker training throughout'}"
        + (
            f"; pinned: the API on CPU {PINS['api']}, the worker and wrk on CPUs {PINS['load']}."
            if PINS
            else "; nothing pinned."
        )
    )
    print(
        "Server p99 / max: the API's own time for the route, from its /metrics histogram "
        "(bucket upper ends); loop lag: how late its event loop answered a ping sent every "
        "0.1 s. A client p99 far above the server's, with no loop lag, is time spent waiting "
        "for a CPU, not in the API."
    )
    print(f"Goals: {GOALS}.")
    for mode in modes:
        print()
        print(f"## {mode.name} ({mode.seconds:.0f} s)")
        print()
        print(
            "| endpoint | conns | req/s | x bare | p50 ms | p99 ms | server p99 / max ms "
            "| loop lag max ms | bytes | non-2xx | 5xx | sock err | stalls "
            "| healthz bad (max ms) | server cpu % | threads | pg conns |"
        )
        print(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for r in mode.runs:
            print(
                f"| {r.target} | {r.connections} | {r.requests_per_s:.0f} | "
                f"{fmt(r.ratio, 2)} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} | "
                f"{spread_ms(r.server)} | {r.lag.ms('max') if r.lag else '-'} | "
                f"{fmt(r.bytes_per_response, 0)} | {r.non_2xx} | "
                f"{'-' if r.errors_5xx is None else r.errors_5xx} | {r.socket_errors} | "
                f"{r.stalls} | {r.health_bad} ({r.health_max_ms:.0f}) | {fmt(r.cpu_percent, 0)} | "
                f"{r.threads_max if r.threads_max is not None else '-'} | "
                f"{r.pg_max if r.pg_max is not None else '-'} |"
            )
        if s := mode.streams:
            got = sum(1 for e in s.events if e)
            events = sorted(s.events)
            first = sorted(s.first_event_s)
            print()
            print(
                f"Event streams: {s.streams} on a {s.job_status} job, held {s.hold_s:.0f} s: "
                f"{got}/{s.streams} got at least one event; events per stream min "
                f"{events[0]} / median {statistics.median(events):.0f} / max {events[-1]}; "
                f"first event after p50 {fmt(statistics.median(first) if first else None, 2)} s, "
                f"max {fmt(first[-1] if first else None, 2)} s; failures "
                f"{dict(s.failures) or 'none'}; API threads {s.threads_before} before, "
                f"{s.threads_during} during"
                + (f"; PostgreSQL connections during {s.pg_during}" if s.pg_during else "")
                + f"; a plain GET /v1/jobs/{{id}} meanwhile: {s.probe_status} in "
                f"{fmt(s.probe_ms, 0)} ms."
            )
        if mode.events:
            print()
            print(
                "| under 8 pollers of GET /v1/jobs?limit=20 | what it did | took s | polls "
                "| longest gap ms | failed polls | 5xx | server p99 / max ms | loop lag max ms |"
            )
            print("|---|---|---:|---:|---:|---|---:|---:|---:|")
            for e in mode.events:
                failed = ", ".join(f"{k} x{v}" for k, v in e.errors.items()) or "0"
                print(
                    f"| {e.label} | {e.outcome} | {e.action_s:.2f} | {e.answers} | "
                    f"{e.longest_gap_ms:.0f} | {failed} | "
                    f"{'-' if e.errors_5xx is None else e.errors_5xx} | {spread_ms(e.server)} | "
                    f"{e.lag.ms('max') if e.lag else '-'} |"
                )
        for note in mode.notes:
            print(f"- {note}")
    print()
    print("Against the goals:")
    for mode in modes:
        graft_runs = [r for r in mode.runs if r.target != "bare"]
        stalls = sum(r.stalls for r in graft_runs)
        errors = sum(r.errors_5xx or 0 for r in graft_runs)
        unknown = any(r.errors_5xx is None for r in graft_runs)
        health = sum(r.health_bad for r in graft_runs)
        ratios = [r.ratio for r in graft_runs if r.ratio is not None]
        p99s = [r.p99_ms for r in graft_runs if r.p99_ms is not None]
        print(
            f"- {mode.name}: stalls {stalls} (goal 0), 5xx {errors}{'+?' if unknown else ''} "
            f"(goal 0), healthz over 2 s or failed {health} (goal 0), x bare "
            f"{fmt(min(ratios, default=None), 2)}-{fmt(max(ratios, default=None), 2)} "
            f"(goal >= 0.5), p99 up to {fmt(max(p99s, default=None))} ms (goal <= 50 on a quiet "
            f"machine{'' if args.quiet_machine else '; this run had a busy worker'})"
        )
    print(f"\nTook {took:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["embedded", "production", "both"], default="both")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--quiet-machine", action="store_true", help="no worker: jobs stay queued")
    parser.add_argument(
        "--poll-cache-s",
        type=float,
        default=None,
        help="GRAFT_POLL_CACHE_S for the API (0: nothing remembered; requests for the same "
        "answer at the same moment still share one read)",
    )
    parser.add_argument("--sse-streams", type=int, default=256)
    parser.add_argument("--sse-seconds", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=20, help="jobs submitted before measuring")
    parser.add_argument("--views", type=int, default=64, help="augmented views: job length")
    parser.add_argument("--images-per-label", type=int, default=40, help="old-label images")
    parser.add_argument("--base-epochs", type=int, default=1, help="training of the base model")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="taskset: the API (and the bare app) on the first CPU, the worker and wrk on the rest",
    )
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "BODY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), Path(args.serve_bare[1]))
        return
    if shutil.which("wrk") is None:
        parser.error("wrk is needed: apt-get install wrk")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            parser.error("--pin needs taskset and at least 2 CPUs")
        PINS.update(api=str(cpus[0]), load=",".join(map(str, cpus[1:])))

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    load_before = os.getloadavg()
    started = time.monotonic()
    names = ["embedded", "production"] if args.mode == "both" else [args.mode]
    try:
        with scratch_folder() as scratch:
            print("training the digits 0-8 base model", flush=True)
            weights, held = train_base(scratch, args.base_epochs)
            modes = [measure_mode(name, args, weights, held, scratch) for name in names]
    except KeyboardInterrupt:
        sys.exit("interrupted: the servers are stopped and the database dropped")
    report(modes, args, load_before, time.monotonic() - started)


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="graft-load-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
