"""Webhooks: when a job with a ``notify_url`` ends, its JSON is POSTed there, signed.

The jobs table is the outbox: a job whose status is final and whose ``notify_state`` is
``pending`` is due. Each delivery is claimed with a conditional update (so several API hosts
never send the same attempt twice), sent outside any transaction, then recorded: ``delivered``,
or retried with exponential backoff until ``webhook_max_attempts``, then ``failed``.

Signature: ``Graft-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``;
check it with :func:`graft.client.verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import or_, select

from app.jobs import job_read
from app.outbound import destination
from core import job_state
from core.db import session_scope, utcnow
from core.job_state import FINAL
from core.models import Job
from core.settings import Settings

log = logging.getLogger(__name__)
CLAIM = timedelta(seconds=60)


def webhook_secret(settings: Settings) -> str:
    """``GRAFT_WEBHOOK_SECRET``, or a secret made once and kept in the data folder."""
    if settings.webhook_secret:
        return settings.webhook_secret
    path = settings.data_dir.resolve() / "webhook.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def deliver_due(settings: Settings, limit: int = 20) -> int:
    """Send the webhooks that are due; returns how many were delivered."""
    now = utcnow()
    due = (
        Job.notify_state == "pending",
        Job.status.in_(FINAL),
        or_(Job.notify_next_at.is_(None), Job.notify_next_at <= now),
    )
    with session_scope(settings.resolved_database_url) as session:
        candidates = list(session.scalars(select(Job.id).where(*due).limit(limit)))
    return sum(_deliver(settings, job_id, due) for job_id in candidates)


def _deliver(settings: Settings, job_id: str, due: tuple) -> bool:
    with session_scope(settings.resolved_database_url) as session:
        if not job_state.claim_delivery(session, job_id, due, utcnow() + CLAIM):
            return False
        job = session.get(Job, job_id)
        body = job_read(job).model_dump_json().encode()
        url, attempt, status = job.notify_url, job.notify_attempts + 1, job.status
    delivered = _post(settings, url, body, job_id, attempt, status)
    with session_scope(settings.resolved_database_url) as session:
        if delivered:
            values = {"notify_state": "delivered", "notify_attempts": attempt}
        elif attempt >= settings.webhook_max_attempts:
            values = {"notify_state": "failed", "notify_attempts": attempt}
        else:
            backoff = settings.webhook_backoff_s * 2 ** (attempt - 1)
            values = {
                "notify_attempts": attempt,
                "notify_next_at": utcnow() + timedelta(seconds=backoff),
            }
        job_state.record_delivery(session, job_id, **values)
    return delivered


def _post(
    settings: Settings, url: str, body: bytes, job_id: str, attempt: int, status: str
) -> bool:
    target = destination(url, settings)
    if isinstance(target, str):
        log.warning("webhook for job %s not sent: %s", job_id, target)
        return False
    headers = {
        "Host": target.host,
        "Content-Type": "application/json",
        "User-Agent": "graft-webhooks",
        "Graft-Event": f"job.{status}",
        "Graft-Delivery": f"{job_id}-{attempt}",
        "Graft-Signature": sign(body, webhook_secret(settings)),
    }
    try:
        with httpx.Client(timeout=10, follow_redirects=False) as http:
            response = http.request(
                "POST",
                target.url,
                content=body,
                headers=headers,
                # TLS is checked against the name, though the connection is to the address
                extensions={"sni_hostname": urlsplit(url).hostname or ""},
            )
    except httpx.HTTPError as exc:
        log.warning("webhook for job %s to %s failed (attempt %d): %s", job_id, url, attempt, exc)
        return False
    if response.is_success:
        return True
    log.warning(
        "webhook for job %s to %s answered %d (attempt %d)",
        job_id,
        url,
        response.status_code,
        attempt,
    )
    return False
