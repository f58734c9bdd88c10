"""The HTTP side of refusing what the database cannot store (``core.inputs``): a path, query
value or header holding a control character is refused before any route runs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from core.inputs import ANY_CONTROL, HEADER_CONTROL

if TYPE_CHECKING:  # the schemas (and so the Python client) need no web framework
    from starlette.types import ASGIApp, Receive, Scope, Send


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
