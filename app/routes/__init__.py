"""Routers. Every error they may answer is declared, as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from pydantic import BaseModel

from app.schemas import Problem

_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing, unknown or revoked API key",
    404: "No such resource (or it belongs to another owner)",
    409: "Conflict with the resource's current state",
    413: "Request body over the size limit",
    416: "A `Range` outside the file, or malformed; `Content-Range` gives the file's length",
    422: "Invalid input; `errors` names the fields",
    503: "A dependency is unreachable",
    507: "Not enough free disk for the upload; `detail` says how much is needed",
}


PROBLEM_MEDIA_TYPE = "application/problem+json"


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    return {
        code: {
            "model": Problem,
            "description": _DESCRIPTIONS[code],
        }
        for code in codes
    }


def problem_media_types(spec: dict[str, Any]) -> dict[str, Any]:
    """Declare error bodies under ``application/problem+json``, the type they are sent with
    (FastAPI files them under the route's own media type)."""
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                problem = next(
                    (
                        c
                        for c in content.values()
                        if c.get("schema", {}).get("$ref", "").endswith("/Problem")
                    ),
                    None,
                )
                if status[0] in "45" and problem is not None:
                    response["content"] = {PROBLEM_MEDIA_TYPE: problem}
    return spec


def json_response(
    body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as JSON, serialized once: a returned model would be dumped, validated against
    the route's ``response_model`` and dumped again."""
    return Response(body.model_dump_json(), status_code, headers, media_type="application/json")
