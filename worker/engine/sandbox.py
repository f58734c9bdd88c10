"""Run a step on untrusted bytes in a process of its own, with bounded memory, time and disk.

A model file a user sends is opened, run and written out only in such a process
(:mod:`worker.engine.intake`): a hostile or enormous file can exhaust the child's limits, never
the server's. The child gets an address-space limit (``RLIMIT_AS``), a CPU-time limit, a cap on
the size of any file it writes (``RLIMIT_FSIZE``), a cap on open files, no core dumps, a wall
clock, an environment with nothing of the server's (no credentials, no network for hub
downloads) and its scratch folder as working directory. It answers with a JSON file in that
folder; a refusal is ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.engine.errors import WeightsError

GiB = 1024**3
ANSWER = "answer.json"  # what the child writes in its folder
_ENV_KEPT = ("PATH", "PYTHONPATH", "HOME", "LANG", "TMPDIR")
_ENV_SET = {
    "KERAS_BACKEND": "torch",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "PYTHONDONTWRITEBYTECODE": "1",
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
    """``python -m module *argv`` in ``folder`` under ``limits``; the JSON it wrote as
    ``folder/ANSWER``. :class:`Refused` when it refused (its reason), :class:`OverLimit`
    when it went past a limit (which one, and the setting); ``what`` names the step."""
    answer = folder / ANSWER
    answer.unlink(missing_ok=True)
    threads = str(limits.threads)
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT}
    env |= _ENV_SET | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_root(), env.get("PYTHONPATH")]))

    def constrain() -> None:  # in the child, before Python starts
        cpu = int(limits.wall_s * max(limits.threads, 1)) + 30
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    child = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=folder,
        env=env,
        preexec_fn=constrain,
        start_new_session=True,  # its own process group: a timeout kills what it started too
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    try:
        _, stderr = child.communicate(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        _kill(child)
        raise OverLimit(
            f"{what} took longer than {limits.wall_s:.0f} s (GRAFT_MODEL_CHECK_TIMEOUT_S)"
        ) from None
    finally:
        _kill(child)
    if answer.is_file():
        try:
            data = json.loads(answer.read_text())
        except ValueError:
            data = {"error": f"{what} gave no readable answer"}
        if child.returncode == 0 and "error" not in data:
            return data
        if "error" in data:
            raise Refused(str(data["error"]), str(data.get("field") or "weights"))
    raise _failure(child.returncode, stderr or "", limits, what)


def _failure(code: int, stderr: str, limits: Limits, what: str) -> OverLimit:
    signals = {
        -signal.SIGXCPU: "more CPU time than allowed",
        -signal.SIGXFSZ: f"a file larger than {limits.file_bytes / GiB:.1f} GiB",
        -signal.SIGKILL: "more memory than the machine could give",
        -signal.SIGSEGV: "more memory than allowed (it crashed)",
        -signal.SIGABRT: "more memory than allowed (it aborted)",
    }
    text = stderr.lower()
    if any(sign in text for sign in _MEMORY_SIGNS):
        return OverLimit(
            f"{what} needed more memory than allowed ({limits.memory_bytes / GiB:.1f} GiB, "
            "GRAFT_MODEL_CHECK_MEMORY_BYTES)"
        )
    if code in signals:
        return OverLimit(f"{what} needed {signals[code]}")
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit code {code}"
    return OverLimit(f"{what} stopped unexpectedly ({last})")


_MEMORY_SIGNS = ("memoryerror", "bad_alloc", "allocate", "failed to map", "out of memory")


def _kill(child: subprocess.Popen) -> None:
    """The child and anything it started (its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _root() -> str:
    """The folder that holds the ``worker`` package, for a child started elsewhere."""
    return str(Path(__file__).resolve().parents[2])
