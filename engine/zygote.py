"""A process that imports the engine once and forks one bounded child per sandboxed step.

Starting Python and importing torch, timm, onnx and onnxruntime costs seconds; a registration
that started a fresh interpreter paid it every time. The server starts this process once
(:mod:`engine.sandbox` does, with the sandbox's scrubbed environment), hands it a
listening Unix socket, and asks it for a child per step: the zygote forks, the child leaves
the zygote's session, closes the zygote's sockets, takes its limits (address space, CPU, file
size, open files, no core dumps), works in its scratch folder with its standard error in
``stderr.txt`` there, and calls the step's ``main(argv)``. The zygote answers each request
with the child's pid, then with its exit code once it has reaped it; it runs nothing of a
request itself, so nothing a model does reaches it. It stops when the server does (its
standard input closes).

``python -m engine.zygote FD``: ``FD`` is the inherited listening socket.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

# What every step imports; optional ones are skipped when absent. None of them may start a
# thread or compute at import (a fork keeps only the thread that forks).
PRELOAD = (
    "torch",
    "timm",
    "safetensors.torch",
    "onnx",
    "onnxruntime",
    "keras",
    "transformers",
    "engine.artifacts",
    "engine.probe",
    "engine.intake",
)
STDERR = "stderr.txt"  # the child's standard error, in its folder
MAX_REQUEST = 1 << 20


def main(argv: list[str]) -> int:
    listener = socket.socket(fileno=int(argv[0]))
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (a step imports it again, and says why)
            if not isinstance(exc, ImportError):
                traceback.print_exc()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd rings
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "request")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "server")
    waiting: dict[int, socket.socket] = {}
    closing = [listener, wake_r, wake_w, selector]
    while True:
        for key, _ in selector.select():
            if key.data == "server" and not os.read(sys.stdin.fileno(), 4096):
                for pid in waiting:  # the server is gone: so is its work
                    _kill_group(pid)
                return 0
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
            if key.data == "request":
                conn, _ = listener.accept()
                pid = _fork(conn, [*closing, *waiting.values()])
                if pid is not None:
                    waiting[pid] = conn
        _reap(waiting)


def _fork(conn: socket.socket, closing: list[Any]) -> int | None:
    """Read one request from ``conn`` and fork its child; its pid (sent on ``conn`` too)."""
    try:
        conn.settimeout(10)
        request = json.loads(_read_line(conn))
    except (OSError, ValueError):
        conn.close()
        return None
    try:
        pid = os.fork()
    except OSError:  # no memory or processes left for one more: this request fails alone
        conn.close()
        return None
    if pid == 0:
        _child(request, conn, closing)  # never returns
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"code": code}).encode() + b"\n")
            conn.close()


def _child(request: dict[str, Any], conn: socket.socket, closing: list[Any]) -> None:
    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills what it started too
        signal.set_wakeup_fd(-1)
        # Python ignores SIGPIPE and SIGXFSZ: a child past its file-size limit must die of it
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        for item in closing:
            with contextlib.suppress(OSError):
                if isinstance(item, int):
                    os.close(item)
                else:
                    item.close()
        conn.close()
        os.chdir(request["folder"])
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        err = os.open(STDERR, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(err, 2)
        limits = request["limits"]
        _constrain(limits)
        threads = str(limits["threads"])
        os.environ |= {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(limits["threads"])
        argv = list(request["argv"])
        sys.argv = [request["module"], *argv]
        code = _exit_code(importlib.import_module(request["module"]).main(argv))
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # noqa: BLE001 (the parent reads why from stderr.txt)
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code & 0xFF)


def _exit_code(value: object) -> int:
    """What ``sys.exit(value)`` exits with: None is success, an int itself, else failure."""
    if value is None:
        return 0
    return value if isinstance(value, int) else 1


def _constrain(limits: dict[str, Any]) -> None:
    memory, files = limits["memory_bytes"], limits["file_bytes"]
    cpu = int(limits["wall_s"] * max(limits["threads"], 1)) + 30
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (files, files))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk or len(data) > MAX_REQUEST:
            raise ValueError("no request")
        data += chunk
    return data


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
