"""The service's exception hierarchy, mapped once to RFC 9457 problem+json in app.main."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 400
    title = "Bad request"
    type_ = "about:blank"
    headers: dict[str, str] = {}

    def __init__(self, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class Unauthorized(ServiceError):
    status = 401
    title = "Unauthorized"
    type_ = "https://graft.dev/problems/unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status = 404
    title = "Not found"
    type_ = "https://graft.dev/problems/not-found"


class Conflict(ServiceError):
    status = 409
    title = "Conflict"
    type_ = "https://graft.dev/problems/conflict"


class InProgress(Conflict):
    """The same request is being handled right now; retrying in a moment will find it done."""

    headers = {"Retry-After": "1"}


class Invalid(ServiceError):
    status = 422
    title = "Unprocessable content"
    type_ = "https://graft.dev/problems/invalid"

    def __init__(
        self, detail: str, field: str | None = None, errors: list[dict[str, Any]] | None = None
    ) -> None:
        if field and not errors:
            errors = [{"field": field, "message": detail}]
        super().__init__(detail, errors)


class TooLarge(ServiceError):
    status = 413
    title = "Content too large"
    type_ = "https://graft.dev/problems/too-large"


class RangeNotSatisfiable(ServiceError):
    """A ``Range`` a file cannot answer; says how long the file is, as RFC 9110 asks."""

    status = 416
    title = "Range not satisfiable"
    type_ = "https://graft.dev/problems/range-not-satisfiable"

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.headers = {"Content-Range": f"bytes */{size}"}


class Unavailable(ServiceError):
    status = 503
    title = "Service unavailable"
    type_ = "https://graft.dev/problems/unavailable"


class InsufficientStorage(ServiceError):
    status = 507
    title = "Insufficient storage"
    type_ = "https://graft.dev/problems/insufficient-storage"
