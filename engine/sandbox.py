"""Run a step on untrusted bytes in a process of its own, with bounded memory, time and disk.

A model file a user sends is opened, run and written out only in such a process
(:mod:`engine.intake`): a hostile or enormous file can exhaust the child's limits, never
the server's. The child is forked from a zygote that has imported the engine once
(:mod:`engine.zygote`), so a step does not pay for starting Python and importing torch.
It gets an address-space limit (``RLIMIT_AS``), a CPU-time limit, a cap on
the size of any file it writes (``RLIMIT_FSIZE``), a cap on open files, no core dumps, a wall
clock, an environment with nothing of the server's (no credentials, no network for hub
downloads) and its scratch folder as working directory. It answers with a JSON file in that
folder; a refusal is ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.errors import WeightsError
from engine.zygote import STDERR

GiB = 1024**3
ANSWER = "answer.json"  # what the child writes in its folder
START_S = 300.0  # how long a first step may wait for the zygote's imports
_ENV_KEPT = ("PATH", "PYTHONPATH", "LANG", "TMPDIR")
_ENV_SET = {
    "KERAS_BACKEND": "torch",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONDONTWRITEBYTECODE": "1",
    # read by the libraries when the zygote imports them (a child only lowers torch's)
    "OMP_NUM_THREADS": "4",
    "OPENBLAS_NUM_THREADS": "4",
    "MKL_NUM_THREADS": "4",
}


@dataclass(frozen=True)
class Limits:
    """What one sandboxed step may use. ``memory_bytes`` is address space (what the process
    maps, which is more than it touches); ``file_bytes`` is the largest file it may write."""

    memory_bytes: int = 16 * GiB
    wall_s: float = 300.0
    file_bytes: int = 8 * GiB
    open_files: int = 1024
    threads: int = 4  # torch, OpenMP and onnxruntime threads

    def describe(self) -> str:
        return (
            f"{self.memory_bytes / GiB:.1f} GiB of memory, {self.wall_s:.0f} s, files of at "
            f"most {self.file_bytes / GiB:.1f} GiB"
        )


class Refused(WeightsError):
    """The child refused the input; ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str = "weights") -> None:
        super().__init__(message)
        self.field = field


class OverLimit(Refused):
    """The child went past one of its limits: the input costs more than a server allows."""


def run(module: str, folder: Path, argv: list[str], limits: Limits, what: str) -> dict[str, Any]:
    """``module.main(argv)`` in ``folder`` under ``limits``, in a child forked from the
    zygote; the JSON it wrote as ``folder/ANSWER``. :class:`Refused` when it refused (its
    reason), :class:`OverLimit` when it went past a limit (which one, and the setting);
    ``what`` names the step."""
    answer = folder / ANSWER
    answer.unlink(missing_ok=True)
    request = {
        "module": module,
        "folder": str(folder.resolve()),
        "argv": argv,
        "limits": asdict(limits),
    }
    code = _ZYGOTE.run(request, limits.wall_s, what)
    stderr = _tail(folder / STDERR)
    if answer.is_file():
        try:
            data = json.loads(answer.read_text())
        except ValueError:
            data = {"error": f"{what} gave no readable answer"}
        if code == 0 and "error" not in data:
            return data
        if "error" in data:
            raise Refused(str(data["error"]), str(data.get("field") or "weights"))
    raise _failure(code, stderr, limits, what)


class _Zygote:
    """The server's side of :mod:`engine.zygote`: started on first use (and again if
    it died), stopped when the server exits."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._process: subprocess.Popen | None = None
        self._folder: Path | None = None
        atexit.register(self.stop)

    def run(self, request: dict[str, Any], wall_s: float, what: str) -> int:
        """The exit code of the child that ran ``request``; killed after ``wall_s``."""
        with self._connect() as conn:
            lines = _Lines(conn)
            conn.sendall(json.dumps(request).encode() + b"\n")
            try:
                first = lines.next(START_S)  # the zygote may still be importing
            except TimeoutError:
                first = None
            if first is None:
                raise OverLimit(f"{what} could not start: the sandbox did not answer")
            pid = int(first["pid"])
            try:
                last = lines.next(wall_s)
            except TimeoutError:
                _kill_group(pid)  # the child and anything it started; the zygote reaps it
                raise OverLimit(
                    f"{what} took longer than {wall_s:.0f} s (GRAFT_MODEL_CHECK_TIMEOUT_S)"
                ) from None
            if last is None:
                raise OverLimit(f"{what} stopped unexpectedly: the sandbox stopped")
            return int(last["code"])

    def _connect(self) -> socket.socket:
        with self._lock:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._start()
                assert self._folder is not None
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.connect(str(self._folder / "socket"))
                    return conn
                except (FileNotFoundError, ConnectionRefusedError):
                    conn.close()  # its socket was removed, or it is going: a new one
                    if attempt == 2:
                        raise
                    self.stop()
            raise AssertionError("unreachable")

    def _start(self) -> None:
        self.stop()
        hide_environment()
        self._folder = Path(tempfile.mkdtemp(prefix="graft-zygote-"))  # 0700: ours only
        (self._folder / "home").mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(self._folder / "socket"))
            listener.listen(64)
            env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT} | _ENV_SET
            env["HOME"] = str(self._folder / "home")  # no cache of the server's to share
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_root(), env.get("PYTHONPATH")]))
            self._process = subprocess.Popen(
                [sys.executable, "-m", "engine.zygote", str(listener.fileno())],
                env=env,
                pass_fds=[listener.fileno()],
                start_new_session=True,
                stdin=subprocess.PIPE,  # closed when this process ends: so does the zygote
                stdout=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        """Stop the zygote (and the children it still runs) and remove its folder."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


class _Lines:
    """JSON lines read from a socket, each within a deadline."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn, self._buffer = conn, b""

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next line (None when the other side closed); TimeoutError past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            self._conn.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = self._conn.recv(4096)
            except TimeoutError:
                raise TimeoutError from None
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


_ZYGOTE = _Zygote()


def stop() -> None:
    """Stop the zygote; the next step starts another (with the environment of that moment)."""
    _ZYGOTE.stop()


def hide_environment() -> None:
    """Make this process's memory and environment (its credentials) unreadable to other
    processes of the same user, such as a model's code in a sandboxed child: Linux's
    ``PR_SET_DUMPABLE`` off (no core dumps; only root may attach a debugger)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def _failure(code: int, stderr: str, limits: Limits, what: str) -> OverLimit:
    signals = {
        -signal.SIGXCPU: "more CPU time than allowed",
        -signal.SIGXFSZ: f"a file larger than {limits.file_bytes / GiB:.1f} GiB",
        -signal.SIGKILL: "more memory than the machine could give",
    }
    memory = f"{limits.memory_bytes / GiB:.1f} GiB, GRAFT_MODEL_CHECK_MEMORY_BYTES"
    text = stderr.lower()
    if any(sign in text for sign in _MEMORY_SIGNS):
        return OverLimit(f"{what} needed more memory than allowed ({memory})")
    if code in signals:
        return OverLimit(f"{what} needed {signals[code]}")
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit code {code}"
    if code in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS):
        return OverLimit(
            f"{what} crashed ({signal.Signals(-code).name}: {last}); a large model may need "
            f"more memory than allowed ({memory})"
        )
    return OverLimit(f"{what} stopped unexpectedly ({last})")


_MEMORY_SIGNS = (
    "memoryerror",
    "bad_alloc",
    "allocate",
    "failed to map",
    "out of memory",
    "start new thread",
)


def _kill_group(pid: int) -> None:
    """A child and anything it started (its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, size: int = 16384) -> str:
    """The end of a child's standard error."""
    try:
        with path.open("rb") as f:
            f.seek(max(path.stat().st_size - size, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _root() -> str:
    """The folder that holds the ``worker`` package, for a child started elsewhere."""
    return str(Path(__file__).resolve().parents[2])
