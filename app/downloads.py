"""Artifact downloads: the whole file or one byte range of it, by GET or HEAD, alike from a
local folder and from S3.

Every answer carries the file's sha256 as a strong ETag and ``Accept-Ranges: bytes``, so a
client cut off midway resumes with ``Range: bytes=<what it has>-`` (and ``If-Range: <etag>``
to be sure the file is the same) and gets the rest of the same bytes.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import Response, StreamingResponse

from core.errors import RangeNotSatisfiable
from core.storage import Storage, iter_chunks

OCTET_STREAM = "application/octet-stream"
_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def byte_range(
    header: str | None, if_range: str | None, etag: str, size: int
) -> tuple[int, int] | None:
    """The bytes ``[start, stop)`` that a ``Range`` header asks of a file of ``size`` bytes,
    or None for the whole file: no header, a unit other than bytes, several ranges (answered
    whole, as RFC 9110 allows), or an ``If-Range`` that is not this file's ETag (the client's
    partial copy is of another file). A malformed bytes range, or one starting past the end,
    raises ``RangeNotSatisfiable``; an end past the file's is cut to it."""
    if header is None or (if_range is not None and if_range.strip() != etag):
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _SPEC.match(spec)
    first, last = match.groups() if match else ("", "")
    if len(first) > 19 or len(last) > 19:  # beyond any file's size (and Python's int limit)
        raise RangeNotSatisfiable(_refusal(header[:80], size), size)
    if first:
        start = int(first)
        stop = min(int(last) + 1, size) if last else size
        if start >= size or (last and int(last) < start):
            raise RangeNotSatisfiable(_refusal(header, size), size)
    elif last and int(last) > 0 and size > 0:  # the last N bytes
        start, stop = max(size - int(last), 0), size
    else:
        raise RangeNotSatisfiable(_refusal(header, size), size)
    return start, stop


def _refusal(header: str, size: int) -> str:
    return (
        f"cannot answer Range {header.strip()!r}: the file has {size} bytes; ask for one range "
        f"'bytes=FIRST-LAST' with FIRST < {size}, 'bytes=FIRST-' or 'bytes=-SUFFIX_LENGTH'"
    )


def artifact_response(
    storage: Storage,
    artifact: dict[str, Any],
    filename: str,
    range_header: str | None,
    if_range: str | None,
    with_body: bool,
) -> Response:
    """The stored file ``artifact`` (``{key, sha256, size_bytes}``) as a download named
    ``filename``: 200 whole, or 206 with ``Content-Range`` for one range; for HEAD
    (``with_body`` false) the same status and headers without the bytes. Opens the file, so
    run it off the event loop."""
    size, etag = artifact["size_bytes"], f'"{artifact["sha256"]}"'
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Content-Length": str(size),
        "ETag": etag,
    }
    status, (start, stop) = 200, (0, size)
    span = byte_range(range_header, if_range, etag, size)
    if span is not None:
        status, (start, stop) = 206, span
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
    if not with_body:
        return Response(status_code=status, headers=headers, media_type=OCTET_STREAM)
    stream = storage.open(artifact["key"], start, stop if span else None)
    return StreamingResponse(
        iter_chunks(stream, stop - start), status, headers, media_type=OCTET_STREAM
    )
