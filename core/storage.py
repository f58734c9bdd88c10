"""Artifact store addressed by URL. Writes are atomic: a reader sees the whole file or none."""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from core.scratch import in_use

if TYPE_CHECKING:
    from core.settings import Settings

CHUNK = 1024 * 1024
S3_CACHE_BYTES = 10 * 1024**3  # GRAFT_S3_CACHE_MB's default
DOWNLOAD_PREFIX = ".download-"  # a download in progress, in the cache folder
STALE_DOWNLOAD_S = 3600.0  # a download not written to for this long was cut off


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size_bytes: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_key(key: str) -> str:
    """Keys are relative POSIX paths with no ``..``: a key can never leave the store."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    """What the service needs of an artifact store."""

    def put_file(self, key: str, source: Path) -> StoredObject: ...
    def open(self, key: str, start: int = 0, stop: int | None = None) -> BinaryIO:
        """The object's bytes from ``start``; the stream may end at ``stop`` or run on past
        it, so a reader of a range reads ``stop - start`` bytes (``iter_chunks``)."""
        ...

    def local_path(self, key: str) -> Path: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list_objects(self, prefix: str) -> Iterator[tuple[str, datetime]]: ...


class LocalStorage:
    """A folder on a local or shared file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(check_key(key)).parts)

    def put_file(self, key: str, source: Path) -> StoredObject:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        fcntl.flock(fd, fcntl.LOCK_EX)  # not a leftover while this process writes it
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, digest.hexdigest(), size)

    def open(self, key: str, start: int = 0, stop: int | None = None) -> BinaryIO:
        """The file from byte ``start`` (``stop`` is the reader's to keep)."""
        stream = self._path(key).open("rb")
        stream.seek(start)
        return stream

    def local_path(self, key: str) -> Path:
        """A path to read the object from; for this store, the object itself."""
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_objects(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """Every file under ``prefix`` (a folder), with when it was last written; the
        leftovers of an interrupted ``put_file`` (``.incoming-*``) included, not one that a
        live ``put_file`` is writing."""
        base = self.root.joinpath(*PurePosixPath(prefix).parts) if prefix else self.root
        for path in base.rglob("*"):
            try:
                if path.name.startswith(".incoming-") and in_use(path):
                    continue
                if path.is_file():
                    mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                    yield path.relative_to(self.root).as_posix(), mtime
            except FileNotFoundError:  # deleted meanwhile
                continue


class S3Storage:
    """An S3-compatible bucket (AWS, MinIO, ...). Objects appear whole or not at all (a PUT, or
    a multipart upload, is atomic); each carries its sha256, checked when it is cached locally.

    Credentials come from the usual AWS variables or instance roles; ``endpoint_url`` points at
    MinIO or another S3-compatible server. Local copies are cached in ``cache_dir``, at most
    ``cache_max_bytes`` of them: the least recently used go first.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache_dir: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        cache_max_bytes: int = S3_CACHE_BYTES,
    ) -> None:
        import boto3

        self.bucket, self.prefix, self.cache_dir = bucket, prefix.strip("/"), cache_dir
        self.cache_max_bytes = cache_max_bytes
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1"
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, source: Path) -> StoredObject:
        digest, size = file_sha256(source), source.stat().st_size
        self.client.upload_file(
            str(source), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": digest}}
        )
        return StoredObject(key, digest, size)

    def open(self, key: str, start: int = 0, stop: int | None = None) -> BinaryIO:
        """The object's bytes ``[start, stop)`` (to its end without ``stop``): a ranged GET
        when not the whole object, so resuming a big download fetches only what is missing."""
        extra: dict[str, str] = {}
        if start or stop is not None:
            extra["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]

    def local_path(self, key: str) -> Path:
        """A verified local copy, downloaded into the cache folder unless it is there. Each
        use marks it recently used; a download makes room by evicting the least recently used
        copies (see ``evict``)."""
        target = self.cache_dir.joinpath(*PurePosixPath(check_key(key)).parts)
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        expected = head.get("Metadata", {}).get("sha256")
        try:
            if target.stat().st_size == head["ContentLength"]:
                os.utime(target)  # used now (access times are often not kept: noatime)
                return target
        except FileNotFoundError:  # not cached, or evicted meanwhile
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=DOWNLOAD_PREFIX)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp)
            if expected and file_sha256(Path(tmp)) != expected:
                raise OSError(f"checksum mismatch for {key}: the stored object is corrupt")
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.evict(keep=target)
        return target

    def evict(self, keep: Path | None = None) -> int:
        """Delete the least recently used cached copies until the cache holds at most
        ``cache_max_bytes``; returns how many went. Never ``keep`` (the copy just asked for,
        which may alone exceed the bound) nor a download in progress; downloads cut off long
        ago go. A copy that a reader has open stays readable to it after its deletion (POSIX),
        and is downloaded again by the next ``local_path``."""
        copies: list[tuple[int, Path, int]] = []
        total, removed = 0, 0
        stale = time.time() - STALE_DOWNLOAD_S
        for path in self.cache_dir.rglob("*"):
            try:
                info = path.stat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if path.name.startswith(DOWNLOAD_PREFIX):
                    if info.st_mtime < stale:
                        path.unlink()
                    continue
            except FileNotFoundError:  # evicted or renamed meanwhile
                continue
            total += info.st_size
            if path != keep:
                copies.append((info.st_mtime_ns, path, info.st_size))
        for _, path, size in sorted(copies):
            if total <= self.cache_max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        self.cache_dir.joinpath(*PurePosixPath(key).parts).unlink(missing_ok=True)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """Every object under ``prefix``, with its last-modified time. (An upload cut off
        midway leaves no object, only an incomplete multipart upload: a bucket lifecycle rule
        aborts those.)"""
        if prefix:
            full = self._key(prefix.strip("/")) + "/"
        else:
            full = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][strip:], item["LastModified"]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise


def iter_chunks(
    stream: BinaryIO, length: int | None = None, chunk_size: int = CHUNK
) -> Iterator[bytes]:
    """Stream an object (at most ``length`` bytes of it) and close it, for responses that
    must not hold a file in memory."""
    left = length
    try:
        while left is None or left > 0:
            chunk = stream.read(chunk_size if left is None else min(chunk_size, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk
    finally:
        stream.close()


@lru_cache
def _open(
    url: str, cache_dir: Path, endpoint_url: str | None, region: str | None, cache_max_bytes: int
) -> Storage:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        return S3Storage(
            parsed.netloc, parsed.path, cache_dir, endpoint_url, region, cache_max_bytes
        )
    raise ValueError(f"unsupported storage URL scheme {parsed.scheme!r} (supported: file, s3)")


def open_storage(settings: Settings) -> Storage:
    """The artifact store of ``settings`` (one client per configuration, reused)."""
    return _open(
        settings.resolved_storage_url,
        settings.data_dir.resolve() / "cache",
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_cache_mb << 20,
    )
