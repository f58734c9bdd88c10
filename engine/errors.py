"""One exception hierarchy for the engine; the service maps ``code`` to its own errors."""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """A problem with the user's model, weights or data, not a bug in Graft."""

    code = "engine_error"


class UnknownArchitecture(EngineError):
    code = "unknown_architecture"

    def __init__(self, architecture: str, close_matches: list[str]) -> None:
        self.architecture = architecture
        self.close_matches = close_matches
        hint = f"; close matches: {', '.join(close_matches)}" if close_matches else ""
        super().__init__(f"unknown architecture {architecture!r}{hint}")


class WeightsError(EngineError):
    """Weights that cannot be read or do not fit the architecture."""

    code = "invalid_weights"


class UnsupportedHead(EngineError):
    code = "unsupported_head"


class DataError(EngineError):
    code = "invalid_data"


class ExportFailed(EngineError):
    """The model cannot be written in a format (its architecture does not trace or export)."""

    code = "export_failed"


class JobCancelled(Exception):
    """Raised between steps when the caller asked the engine to stop."""


class OutOfMemory(EngineError):
    code = "out_of_memory"


class DiskFull(EngineError):
    code = "disk_full"


_MEMORY_SIGNS = (
    "cannot allocate memory",
    "can't allocate memory",
    "out of memory",
    "failed to allocate",
)
_GPU_MEMORY_SIGNS = (
    "cuda out of memory",
    "cuda error: out of memory",
    "cublas_status_alloc_failed",
)
_THREAD_SIGNS = ("can't start new thread", "cannot start new thread")
_DISK_SIGNS = ("no space left on device", "database or disk is full", "disk quota exceeded")


def resource_error(exc: BaseException) -> EngineError | None:
    """The out-of-memory or disk-full condition behind ``exc`` (or any exception it came
    from), as an error that says what to change; None if there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        errno = getattr(current, "errno", None)
        if any(s in text for s in _GPU_MEMORY_SIGNS):
            return OutOfMemory(
                f"the GPU ran out of memory ({_short(current)}). Lower GRAFT_EXTRACT_BATCH_SIZE "
                "or the job's batch_size, or run the job on a worker with a larger GPU"
            )
        if any(s in text for s in _THREAD_SIGNS):
            return OutOfMemory(
                f"the worker could not start a thread ({_short(current)}): it reached its "
                "memory or process limit (the address space it may map, `ulimit -v`; its "
                "processes and threads, `ulimit -u` or the container's pids limit). Raise the "
                "limit, or run fewer workers or jobs on the machine"
            )
        if isinstance(current, MemoryError) or errno == 12 or any(s in text for s in _MEMORY_SIGNS):
            return OutOfMemory(
                f"the worker ran out of memory ({_short(current)}). Use fewer images per job, "
                "lower GRAFT_FEATURE_MEMORY_MB (cached features beyond it are memory-mapped "
                "from disk) or the job's batch_size, or run it on a worker with more memory"
            )
        if errno in (28, 122) or any(s in text for s in _DISK_SIGNS):
            return DiskFull(
                f"the worker's disk is full ({_short(current)}). Free space under its "
                "GRAFT_DATA_DIR (or the database's disk), then submit the job again"
            )
        current = current.__cause__ or current.__context__
    return None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's
    name when it has none): what a message quoting a foreign library's error shows."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def named(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an exception (the type alone when it has no message)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc, limit)}" if text else type(exc).__name__


def _short(exc: BaseException) -> str:
    return first_line(exc, 200)


class Mismatch(WeightsError):
    """The model file disagrees with another field of the request (its labels, its
    architecture); ``field`` names that field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def check_label_count(model: Any, num_labels: int, title: str) -> None:
    """:class:`Mismatch` unless the model's classifier layer (``model.fc``) has ``num_labels``
    outputs."""
    if model.fc.out_features != num_labels:
        raise Mismatch(
            f"{num_labels} labels were given but the {title} model has "
            f"{model.fc.out_features} outputs",
            "labels",
        )
