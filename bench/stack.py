"""A Graft of its own for the benchmarks, started as users start it: processes (optionally
pinned to CPUs), a private Redis and a PostgreSQL database of the run's own, `graft db upgrade`,
`graft api` and `graft worker`, a digits model, a dataset and jobs."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.net import free_port  # noqa: E402
from devkit.services import RedisServer  # noqa: E402

BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
PINS: dict[str, str] = {}  # role ("api", "load") -> CPUs for taskset, with --pin


# Processes and ports ------------------------------------------------------------------------


def pinned(role: str) -> list[str]:
    """``taskset -c CPUS`` for the role's processes under --pin: the API (and the bare app)
    on one core, the worker and wrk on the others."""
    return ["taskset", "-c", PINS[role]] if role in PINS else []


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session of its own (Ctrl-C reaches only this script, which stops it)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
        )


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process and its children, SIGKILL after ``grace_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({process.returncode})\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s\n{tail(log)}")


def threads_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Services -----------------------------------------------------------------------------------


def private_redis(stack: contextlib.ExitStack, folder: Path) -> str:
    """A Redis server of the run's own (devkit's, as the tests use), stopped at the end."""
    server = RedisServer(folder / "redis").start()
    stack.callback(server.stop)
    return server.url


class Postgres:
    """A database of this run's own, dropped at the end; counts its connections."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        import psycopg

        self.name = f"graft_load_{secrets.token_hex(4)}"
        self.admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
        self.lock = threading.Lock()
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        stack.callback(self.drop)
        self.url = f"{PG_SERVER}/{self.name}"

    def connections(self) -> int:
        with self.lock:
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.name,)
            ).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        with self.lock:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.admin.close()


# Graft, and the bare app --------------------------------------------------------------------


def train_base(folder: Path, epochs: int) -> tuple[Path, Any]:
    """The digits 0-8 model of the tests (fewer epochs: its accuracy does not change the
    load), as safetensors, and the held-out digits."""
    import safetensors.torch

    from devkit import digits as D
    from devkit.digits import ARCH, OLD

    base, held = D.load()
    model = D.train_base(base, OLD, ARCH, epochs=epochs)
    path = folder / "digits.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, held


class Graft:
    """`graft api` and (unless quiet) one `graft worker`, a model, a dataset and jobs."""

    def __init__(self, stack: contextlib.ExitStack, env: dict[str, str], folder: Path) -> None:
        import httpx

        self.folder, self.port = folder, free_port()
        self.env = {**env, "GRAFT_HOST": "127.0.0.1", "GRAFT_PORT": str(self.port)}
        self.url = f"http://127.0.0.1:{self.port}"
        upgrade = subprocess.run(
            [str(BIN / "graft"), "db", "upgrade"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if upgrade.returncode:
            raise RuntimeError(f"graft db upgrade failed\n{upgrade.stdout}{upgrade.stderr}")
        self.api_log = folder / "api.log"
        self.api = start([*pinned("api"), str(BIN / "graft"), "api"], self.env, self.api_log)
        stack.callback(stop, self.api)
        wait_http(f"{self.url}/healthz", self.api, self.api_log)
        self.worker: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=120)
        stack.callback(self.http.close)
        self.dataset_id = ""
        self.jobs: list[str] = []

    def start_worker(self, stack: contextlib.ExitStack) -> None:
        argv = [*pinned("load"), str(BIN / "graft"), "worker"]
        self.worker = start(argv, self.env, self.folder / "worker.log")
        stack.callback(stop, self.worker, 30.0)

    def upload(self, weights: Path, held: Any, images_per_label: int) -> None:
        from devkit.digits import digits_archive, register_digits

        answer = register_digits(self.http, weights)
        if answer.status_code != 201:
            raise RuntimeError(f"registering the model: {answer.status_code} {answer.text}")
        archive = digits_archive(held, old_per_class=images_per_label, new_shots=10)
        answer = self.http.post("/v1/datasets", files={"archive": ("digits.zip", archive)})
        if answer.status_code != 201:
            raise RuntimeError(f"uploading the dataset: {answer.status_code} {answer.text}")
        self.dataset_id = answer.json()["id"]

    def submit(self, views: int) -> str:
        body = {
            "model": "digits",
            "base_version": 1,
            "dataset_id": self.dataset_id,
            "config": {"augmentation": {"views": views, "rotation_degrees": 5}},
        }
        answer = self.http.post("/v1/jobs", json=body)
        if answer.status_code != 202:
            raise RuntimeError(f"submitting a job: {answer.status_code} {answer.text}")
        self.jobs.append(answer.json()["id"])
        return self.jobs[-1]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def count(self, status: str) -> int:
        page = self.http.get("/v1/jobs", params={"status": status, "limit": 500}).json()
        return len(page["items"])

    def running_job(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            items = self.http.get("/v1/jobs", params={"status": "running"}).json()["items"]
            if items:
                return items[0]["id"]
            if self.worker is not None and self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited\n{tail(self.folder / 'worker.log')}")
            time.sleep(0.5)
        return None

    def next_success(self, timeout_s: float = 300) -> str:
        """Wait for the next job to succeed (its export and version write)."""
        done = self.count("succeeded")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count("succeeded") > done:
                return f"job {done + 1} succeeded"
            time.sleep(0.2)
        return f"no job succeeded within {timeout_s:.0f} s"

    def delete_model(self) -> str:
        """DELETE the model with force: every version's files, its jobs (a running one too)."""
        versions = len(self.http.get("/v1/models/digits").json()["versions"])
        files = sum(1 for p in (self.folder / "var" / "artifacts").rglob("*") if p.is_file())
        answer = self.http.delete("/v1/models/digits", params={"force": "true"})
        return f"{versions} versions, {files} stored files: HTTP {answer.status_code}"


class Feeder(threading.Thread):
    """Keeps at least one job queued behind the running one, so the worker never idles."""

    def __init__(self, graft: Graft, views: int) -> None:
        super().__init__(name="feeder", daemon=True)
        self.graft, self.views = graft, views
        self.halt = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.halt.wait(2.0):
            try:
                if self.graft.count("queued") < 1:
                    self.graft.submit(self.views)
            except Exception as exc:  # a slow answer under load: try again
                self.error = f"{type(exc).__name__}: {exc}"
