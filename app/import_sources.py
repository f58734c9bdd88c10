"""What an import reads: the objects under an S3 prefix, or those a manifest lists, fetched in
parallel to disk and checked exactly as uploaded images are (app.datasets).

Every object is streamed to its own file with a running count, so memory stays bounded
whatever the objects hold; the per-file, total-size and file-count limits of uploads apply,
and the reasons a file is rejected read the same (``path`` is the object's key, or its uri
in a manifest).
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from app import s3uri
from app.archives import (
    ArchiveLimits,
    deduplicate,
    folder_problem,
    is_ignored,
    safe_parts,
    verify_image,
)
from core.errors import Invalid
from core.storage import file_sha256

CHUNK = 256 * 1024
MAX_MANIFEST_LINE = 2048  # bytes a manifest may spend per line, on average
MISSING = ("NoSuchKey", "404", "NotFound")
DENIED = ("AccessDenied", "403", "AllAccessDisabled")


class ImportFailed(Exception):  # noqa: N818 (the import's outcome, with the code users see)
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Stopped(Exception):  # noqa: N818
    """The import was given up (deleted, taken over, or the server is stopping)."""


@dataclass(frozen=True)
class Entry:
    path: str  # as reported: the object's key, or its uri
    bucket: str
    key: str
    label: str
    size: int | None = None


@dataclass
class Copied:
    images: list[tuple[str, str, Path]] = field(default_factory=list)  # (label, ext, file)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def distinct(self) -> Copied:
        """Each image once (see ``app.archives.deduplicate``); the rest named in rejected."""
        labelled = [
            (label, ext, path, file_sha256(path), shown)
            for (label, ext, path), shown in zip(self.images, self.shown, strict=True)
        ]
        rejected = list(self.rejected)
        return Copied(deduplicate(labelled, rejected), rejected)

    shown: list[str] = field(default_factory=list)  # each image's path as its source named it


_creating = threading.Lock()  # making a boto3 client is not thread-safe; using one is


def s3_client(endpoint_url: str | None, region: str | None, threads: int) -> Any:
    """One client per configuration, shared by the threads of every import; its connection
    pool fits the threads."""
    with _creating:
        return _client(endpoint_url, region, threads)


@lru_cache
def _client(endpoint_url: str | None, region: str | None, threads: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=threads + 4,
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
    )


def error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def max_manifest_bytes(limits: ArchiveLimits) -> int:
    return limits.max_members * MAX_MANIFEST_LINE


def list_prefix(
    client: Any, uri: s3uri.S3Uri, limits: ArchiveLimits, listed: Callable[[int], None]
) -> tuple[list[Entry], list[dict[str, str]]]:
    """Every object under the prefix that may be an image: ``(entries, rejected)``. The first
    folder below the prefix is the label."""
    entries: list[Entry] = []
    rejected: list[dict[str, str]] = []
    count = total = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key)
    for page in pages:
        for item in page.get("Contents", []):
            key, size = item["Key"], int(item["Size"])
            if key.endswith("/"):  # a folder marker
                continue
            count += 1
            if count > limits.max_members:
                raise ImportFailed(
                    "too_many_files", f"{uri} holds more than {limits.max_members} objects"
                )
            try:
                parts = safe_parts(key[len(uri.key) :])
            except Invalid:
                rejected.append({"path": key, "reason": "unsafe path ('..' or absolute)"})
                continue
            if not parts or is_ignored(parts):
                continue
            if problem := folder_problem(parts):
                rejected.append({"path": key, "reason": problem["reason"]})
                continue
            if size > limits.max_member_bytes:
                rejected.append({"path": key, "reason": "file larger than the per-file limit"})
                continue
            total += size
            if total > limits.max_total_bytes:
                raise ImportFailed("too_large", f"the images under {uri} exceed the size limit")
            entries.append(Entry(key, uri.bucket, key, parts[0], size))
        listed(count)
    return entries, rejected


def label_problem(label: str) -> str | None:
    """Why a manifest's label cannot name a label folder, or None."""
    if not label:
        return "empty label"
    if "/" in label or "\\" in label or label in (".", "..") or label.startswith("."):
        return "a label must not contain slashes or start with '.'"
    if not label.isprintable() or len(label) > 200:
        return "labels must be printable and at most 200 characters"
    return None


def parse_manifest(
    path: Path, limits: ArchiveLimits, allowed: frozenset[str]
) -> tuple[list[Entry], list[dict[str, str]]]:
    """The manifest's ``uri,label`` lines: ``(entries, rejected)``. A line whose uri is
    malformed, or in a bucket the server does not import from, is rejected."""
    entries: list[Entry] = []
    rejected: list[dict[str, str]] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if number > limits.max_members + 1:
                    raise ImportFailed(
                        "too_many_files", f"the manifest has more than {limits.max_members} lines"
                    )
                if not row or not "".join(row).strip():
                    continue
                if number == 1 and [c.strip().lower() for c in row] == ["uri", "label"]:
                    continue
                shown = row[0].strip() if row[0].strip() else f"line {number}"
                if len(row) != 2:
                    rejected.append({"path": shown, "reason": "expected a line `uri,label`"})
                    continue
                text, label = row[0].strip(), row[1].strip()
                try:
                    uri = s3uri.parse(text, prefix=False)
                    s3uri.check_allowed(uri, allowed)
                except (s3uri.BadUri, PermissionError) as exc:
                    rejected.append({"path": shown, "reason": str(exc)})
                    continue
                if problem := label_problem(label):
                    rejected.append({"path": shown, "reason": problem})
                    continue
                if is_ignored(tuple(uri.key.split("/"))):
                    continue
                entries.append(Entry(text, uri.bucket, uri.key, label))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImportFailed("manifest_invalid", f"the manifest is not CSV text: {exc}") from None
    return _once(entries, rejected)


def _once(
    entries: list[Entry], rejected: list[dict[str, str]]
) -> tuple[list[Entry], list[dict[str, str]]]:
    """Each object copied once: a line repeating an object under the same label is dropped
    (and said); an object listed under two labels is not imported (which is it?), and named."""
    labels: dict[tuple[str, str], list[str]] = {}
    for e in entries:
        labels.setdefault((e.bucket, e.key), []).append(e.label)
    kept: list[Entry] = []
    seen: set[tuple[str, str]] = set()
    for e in entries:
        where = (e.bucket, e.key)
        distinct = sorted(set(labels[where]))
        if len(distinct) > 1:
            if where not in seen:
                reason = f"listed under {len(distinct)} labels ({', '.join(distinct[:5])})"
                rejected.append({"path": e.path, "reason": reason})
        elif where in seen:
            rejected.append({"path": e.path, "reason": "listed again: copied once"})
        else:
            kept.append(e)
        seen.add(where)
    return kept, rejected


def download(client: Any, bucket: str, key: str, target: Path, cap: int) -> bool:
    """Stream an object to ``target``; False (and nothing kept) if it holds more than ``cap``
    bytes."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    written = 0
    try:
        with target.open("wb") as out:
            while chunk := body.read(CHUNK):
                written += len(chunk)
                if written > cap:
                    break
                out.write(chunk)
    finally:
        body.close()
    if written > cap:
        target.unlink(missing_ok=True)
        return False
    return True


class Copier:
    """Fetch and check ``entries`` with ``threads`` threads into ``folder``; ``stop`` gives up
    between objects (:class:`Stopped`)."""

    def __init__(
        self, client: Any, limits: ArchiveLimits, folder: Path, threads: int, stop: threading.Event
    ) -> None:
        self.client, self.limits, self.folder, self.threads = client, limits, folder, threads
        self.stop = stop
        self.done = 0
        self._lock = threading.Lock()
        self._total_bytes = 0
        self._failure: BaseException | None = None

    def run(self, entries: list[Entry]) -> Copied:
        results: list[tuple[str, str, Path, str] | dict[str, str] | None] = [None] * len(entries)
        queue: Iterator[tuple[int, Entry]] = iter(enumerate(entries))

        def work() -> None:
            while not self.stop.is_set():
                with self._lock:
                    item = next(queue, None)
                if item is None:
                    return
                try:
                    results[item[0]] = self._one(item[0], item[1])
                except BaseException as exc:  # noqa: BLE001 (handed to run's caller)
                    with self._lock:
                        self._failure = self._failure or exc
                    self.stop.set()
                    return
                with self._lock:
                    self.done += 1

        workers = [threading.Thread(target=work, name=f"import-{i}") for i in range(self.threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if self._failure is not None:
            raise self._failure
        if self.stop.is_set():
            raise Stopped()
        copied = Copied()
        for result in results:
            if isinstance(result, dict):
                copied.rejected.append(result)
            elif result is not None:
                copied.images.append(result[:3])
                copied.shown.append(result[3])
        return copied.distinct()

    def _one(self, index: int, entry: Entry) -> tuple[str, str, Path, str] | dict[str, str]:
        from botocore.exceptions import BotoCoreError, ClientError

        target = self.folder / f"{index:07d}"
        cap = self.limits.max_member_bytes
        try:
            if not download(self.client, entry.bucket, entry.key, target, cap):
                return {"path": entry.path, "reason": "file larger than the per-file limit"}
        except ClientError as exc:
            code = error_code(exc)
            if code in MISSING:
                return {"path": entry.path, "reason": "no such object"}
            if code in DENIED:
                return {"path": entry.path, "reason": "the server may not read this object"}
            raise ImportFailed("source_unreadable", f"{entry.path}: {exc}") from None
        except BotoCoreError as exc:
            raise ImportFailed("source_unreachable", f"{entry.path}: {exc}") from None
        size = target.stat().st_size
        with self._lock:
            self._total_bytes += size
            over = self._total_bytes > self.limits.max_total_bytes
        if over:
            raise ImportFailed("too_large", "the images exceed the size limit")
        try:
            ext = verify_image(target, self.limits.max_image_pixels)
        except ValueError as exc:
            target.unlink(missing_ok=True)
            return {"path": entry.path, "reason": str(exc)}
        kept = target.with_suffix(f".{ext}")
        target.rename(kept)
        return entry.label, ext, kept, entry.path
