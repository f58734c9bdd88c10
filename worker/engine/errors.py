"""One exception hierarchy for the engine; the service maps ``code`` to its own errors."""

from __future__ import annotations


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


class JobCancelled(Exception):
    """Raised between steps when the caller asked the engine to stop."""
