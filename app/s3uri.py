"""``s3://bucket/key`` addresses of images to import, checked strictly before any request.

A bucket name follows S3's rules; a key is a relative path with no empty, ``.`` or ``..``
segment (also when percent-encoded), no control characters and no backslashes, so that what
is read is exactly the object the address names and a user cannot reach past a prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
IP_ADDRESS = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
MAX_KEY_BYTES = 1024


class BadUri(ValueError):
    """An address that is not a well-formed ``s3://`` object or prefix."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # a prefix ends with "/" (or is "" for the whole bucket)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def check_bucket(bucket: str) -> str:
    if (
        not BUCKET.match(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or IP_ADDRESS.match(bucket)
        or bucket.startswith("xn--")
        or bucket.endswith("-s3alias")
    ):
        raise BadUri(f"{bucket!r} is not a valid S3 bucket name")
    return bucket


def parse(uri: str, *, prefix: bool) -> S3Uri:
    """The bucket and key of ``uri``; a ``prefix`` is a folder (a trailing ``/`` is added),
    otherwise the uri names one object."""
    if not uri.startswith("s3://"):
        raise BadUri("the address must start with s3://")
    rest = uri[len("s3://") :]
    if any(not c.isprintable() or c.isspace() for c in rest) or "\\" in rest:
        raise BadUri("the address must not contain spaces, control characters or backslashes")
    if "?" in rest or "#" in rest:
        raise BadUri("the address must not have a query or a fragment")
    bucket, _, key = rest.partition("/")
    check_bucket(bucket)
    if prefix and key and not key.endswith("/"):
        key += "/"
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadUri(f"the key is longer than {MAX_KEY_BYTES} bytes")
    segments = key.split("/")
    if prefix:
        segments = segments[:-1]  # after the trailing slash
    elif not key or key.endswith("/"):
        raise BadUri("the address must name an object, not a folder")
    for segment in segments:
        if unquote(segment) in ("", ".", ".."):
            raise BadUri("the key must not have empty, '.' or '..' segments")
    return S3Uri(bucket, key)


def check_allowed(uri: S3Uri, allowed: frozenset[str]) -> None:
    """Raise :class:`PermissionError` for a bucket the server does not import from."""
    if uri.bucket not in allowed:
        raise PermissionError(
            f"bucket {uri.bucket!r} is not one this server imports from "
            "(the server's GRAFT_IMPORT_BUCKETS)"
        )
