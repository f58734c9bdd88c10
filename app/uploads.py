"""Uploads are copied to disk in chunks with a running count: bounded memory, capped size."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import HTTPException, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import TooLarge

CHUNK = 1024 * 1024


def save_upload(upload: UploadFile, target: Path, max_bytes: int) -> Path:
    written = 0
    upload.file.seek(0)
    with target.open("wb") as out:
        while chunk := upload.file.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise TooLarge(f"the upload is larger than {max_bytes} bytes")
            out.write(chunk)
    return target


def upload_size(upload: UploadFile) -> int:
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` (413) while they stream in, whatever
    Content-Length claims; the declared length is checked first so honest clients learn early."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing untouched.
                    raise HTTPException(
                        413, f"the request body is larger than {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, counting_receive, send)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps(
        {
            "type": TooLarge.type_,
            "title": TooLarge.title,
            "status": 413,
            "detail": f"the request body is larger than {max_bytes} bytes",
            "errors": [],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
