"""Datasets registered by reference: images copied in from an allowed S3 bucket by the API.

Registering checks the address and writes the row, ``status: importing``, with no lease. The
importer (a thread of every API process) claims an import whose lease is absent or expired
with a conditional update, so one process copies it at a time; the copying process renews the
lease and writes the progress every second, fenced on the lease it holds. A crashed process
stops renewing: once its lease expires another importer (or the same API restarted) starts
the import again from the beginning. A deletion, or a takeover, fails the next renewal and
the copy stops, removing what it wrote. The result is stored exactly as an uploaded dataset's
(a tar of ``<label>/<n>.<ext>``), under a key of the claim's own, and the row becomes ready
only if the claim still holds; otherwise that tar is deleted again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from app import s3uri
from app.archives import archive_limits
from app.datasets import DatasetStatus
from app.import_sources import (
    MISSING,
    error_code,
    max_manifest_bytes,
    s3_client,
)
from app.schemas import DatasetImport
from core.db import session_scope, utcnow
from core.errors import Invalid, ServiceError, TooLarge, Unavailable
from core.models import Dataset, new_id
from core.settings import Settings

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often the importer looks for imports to take over, and renews its leases
MAX_RUNNING = 2  # imports one process copies at once


class NotAllowed(ServiceError):
    status = 403
    title = "Forbidden"
    type_ = "https://graft.dev/problems/forbidden"


def client_of(settings: Settings) -> Any:
    return s3_client(settings.s3_endpoint_url, settings.s3_region, settings.import_threads)


def check_request(settings: Settings, body: DatasetImport) -> dict[str, str]:
    """The import's ``source`` record, once its address is well-formed, in an allowed bucket
    and readable with the server's credentials (one small request to the store)."""
    from botocore.exceptions import BotoCoreError, ClientError

    allowed = settings.import_bucket_names
    if not allowed:
        raise NotAllowed(
            "importing datasets by reference is off on this server; to turn it on, set "
            "GRAFT_IMPORT_BUCKETS to the buckets it may read (comma-separated), or upload an "
            "archive (multipart field 'archive')"
        )
    if body.source is not None:
        kind, field_name, text = "prefix", "source", body.source
    else:
        kind, field_name, text = "manifest", "manifest", body.manifest or ""
    try:
        uri = s3uri.parse(text, prefix=kind == "prefix")
    except s3uri.BadUri as exc:
        raise Invalid(f"{field_name}: {exc}", field_name) from None
    try:
        s3uri.check_allowed(uri, allowed)
    except PermissionError as exc:
        raise NotAllowed(str(exc)) from None
    client = client_of(settings)
    try:
        if kind == "prefix":
            page = client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.key, MaxKeys=1)
            if not page.get("KeyCount"):
                raise Invalid(f"there are no objects under {uri}", field_name)
        else:
            size = client.head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"]
            limit = max_manifest_bytes(archive_limits(settings))
            if size > limit:
                raise TooLarge(f"the manifest is larger than {limit} bytes")
    except ClientError as exc:
        if error_code(exc) in (*MISSING, "NoSuchBucket"):
            raise Invalid(f"{uri} does not exist", field_name) from None
        raise Invalid(f"the server cannot read {uri} ({error_code(exc)})", field_name) from None
    except BotoCoreError as exc:
        raise Unavailable(f"the object store is unreachable ({exc}); retry shortly") from None
    return {"kind": kind, "uri": str(uri)}


def register(session: Any, owner: str, name: str | None, source: dict[str, str]) -> Dataset:
    """Record the import; the importer copies it in."""
    dataset_id = new_id()
    row = Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        labels={},
        num_images=0,
        rejected=[],
        sha256="",
        storage_key=f"datasets/{dataset_id}/images.tar",  # until the import stores its own
        size_bytes=0,
        status=DatasetStatus.IMPORTING,
        source=source,
        progress=progress(0, None, "waiting to be copied"),
    )
    session.add(row)
    session.flush()
    return row


def progress(done: int, total: int | None, message: str, fraction: float | None = None) -> dict:
    if fraction is None:
        fraction = round(0.95 * done / total, 4) if total else 0.0
    return {"fraction": fraction, "done": done, "total": total, "message": message}


@dataclass
class Lease:
    """One process's claim on one import, fenced on the expiry it last wrote."""

    settings: Settings
    dataset_id: str
    expires: datetime
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _fence(self) -> tuple:
        return (
            Dataset.id == self.dataset_id,
            Dataset.status == DatasetStatus.IMPORTING,
            Dataset.deleted_at.is_(None),
            Dataset.lease_expires_at == self.expires,
        )

    def write(self, **values: Any) -> bool:
        """Write ``values`` (and a renewed lease) if the claim still holds."""
        renewed = utcnow() + timedelta(seconds=self.settings.import_lease_s)
        values.setdefault("lease_expires_at", renewed)
        with self.lock, session_scope(self.settings.resolved_database_url) as session:
            held = session.execute(update(Dataset).where(*self._fence()).values(**values)).rowcount
            if held:
                self.expires = values["lease_expires_at"]
        return bool(held)


def claim(settings: Settings, running: set[str]) -> tuple[Lease, dict[str, str]] | None:
    """Take one import that nobody holds: new, or its copier's lease expired."""
    now = utcnow()
    free = (
        Dataset.status == DatasetStatus.IMPORTING,
        Dataset.deleted_at.is_(None),
        or_(Dataset.lease_expires_at.is_(None), Dataset.lease_expires_at < now),
    )
    with session_scope(settings.resolved_database_url) as session:
        candidates = session.execute(
            select(Dataset.id, Dataset.source).where(*free).order_by(Dataset.created_at).limit(8)
        ).all()
        for dataset_id, source in candidates:
            if dataset_id in running:
                continue
            expires = now + timedelta(seconds=settings.import_lease_s)
            taken = session.execute(
                update(Dataset)
                .where(Dataset.id == dataset_id, *free)
                .values(lease_expires_at=expires)
            ).rowcount
            if taken:
                return Lease(settings, dataset_id, expires), source
    return None
