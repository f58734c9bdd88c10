"""What the database cannot store never reaches it: refused at the boundary, by class.

PostgreSQL refuses a NUL in any text and an integer beyond a column's range (``int4``: 2^31 -
1); SQLite overflows past 2^63. Either would surface as a 500 after part of a request had run.
So, before any route runs:

* a path, query value or header holding a control character is refused (404 for a path, 422
  for a query value, 400 for a header), by ``ControlCharacters``, an ASGI middleware;
* a request body's strings may hold tabs and line breaks but no other control character
  (``Input``, the base of every JSON body, and ``Text`` for form fields);
* every integer that names a stored row or lands in an integer column is at most ``INT4_MAX``
  (``VersionNumber`` and the fields of the bodies).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl

from pydantic import AfterValidator, BaseModel, Field, model_validator

if TYPE_CHECKING:  # the schemas (and so the Python client) need no web framework
    from starlette.types import ASGIApp, Receive, Scope, Send

INT4_MAX = 2**31 - 1  # the largest value of a PostgreSQL integer column
ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tabs and line breaks pass
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a header may hold a tab

VersionNumber = Annotated[int, Field(ge=1, le=INT4_MAX)]


def _refuse_control(value: str) -> str:
    if TEXT_CONTROL.search(value):
        raise ValueError("control characters (such as NUL) are not allowed")
    return value


Text = Annotated[str, AfterValidator(_refuse_control)]  # a form field's string


def control_character_at(data: Any, where: str = "") -> str | None:
    """The path (``a.b[2]``) of the first string in ``data`` that holds a control character
    other than a tab or a line break, in its values or keys; None when there is none."""
    if isinstance(data, str):
        return where or "value" if TEXT_CONTROL.search(data) else None
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and TEXT_CONTROL.search(key):
                return here
            if found := control_character_at(value, here):
                return found
    if isinstance(data, list | tuple):
        for i, value in enumerate(data):
            if found := control_character_at(value, f"{where}[{i}]"):
                return found
    return None


class Input(BaseModel):
    """The base of every request body: no string in it may hold a control character other
    than a tab or a line break."""

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        if found := control_character_at(data):
            raise ValueError(f"{found}: control characters (such as NUL) are not allowed")
        return data


class ControlCharacters:
    """Refuse a request whose path, query values or headers hold a control character, before
    anything else runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, title, detail, field = refusal
        body = json.dumps(
            {
                "type": "https://graft.dev/problems/invalid",
                "title": title,
                "status": status,
                "detail": detail,
                "errors": [{"field": field, "message": detail}],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _refusal(scope: Scope) -> tuple[int, str, str, str] | None:
        if ANY_CONTROL.search(scope.get("path", "")):
            return 404, "Not found", "no such resource: the path holds a control character", "path"
        query = scope.get("query_string", b"").decode("latin-1")
        for name, value in parse_qsl(query, keep_blank_values=True):
            if ANY_CONTROL.search(name) or ANY_CONTROL.search(value):
                shown = name if not ANY_CONTROL.search(name) else "query"
                detail = f"{shown}: control characters (such as NUL) are not allowed"
                return 422, "Unprocessable content", detail, shown
        for name, value in scope.get("headers", []):
            if HEADER_CONTROL.search(value.decode("latin-1")):
                header = name.decode("latin-1")
                detail = f"header {header}: control characters (such as NUL) are not allowed"
                return 400, "Bad request", detail, header
        return None
