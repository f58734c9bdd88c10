"""API keys. A key is shown once; the database keeps its prefix and a hash of it.

Keys look like ``graft_<prefix>_<secret>``: the prefix finds the row, the hash of the whole key
is compared in constant time. Keys carry 256 random bits, so a fast hash is as good as a slow
one here: there is nothing to guess.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import utcnow
from core.errors import NotFound, Unauthorized
from core.models import ApiKey

KEY_PREFIX = "graft_"
LOCAL_OWNER = "local"  # the single user of a loopback server with no keys


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, owner: str) -> tuple[str, ApiKey]:
    """A new key for ``owner``: ``(the key, its row)``. The key itself is not stored."""
    if not owner or len(owner) > 64:
        raise ValueError("owner must be 1 to 64 characters")
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(owner=owner, prefix=prefix, key_hash=_hash(key))
    session.add(row)
    session.flush()
    _with_keys.add(_database(session))
    return key, row


def revoke_key(session: Session, prefix: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        raise NotFound(f"no key with prefix {prefix!r}")
    row.revoked_at = row.revoked_at or utcnow()
    return row


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def owner_of(session: Session, key: str) -> str | None:
    """The owner of an active key, or None."""
    if not key.startswith(KEY_PREFIX):
        return None
    prefix = key.removeprefix(KEY_PREFIX).split("_", 1)[0]
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None:
        hmac.compare_digest(_hash(key), _hash(""))  # same work whether or not the row exists
        return None
    return row.owner if hmac.compare_digest(_hash(key), row.key_hash) else None


# Databases known to have a key: once one exists, one always does (revoked keys are kept).
# "No key yet" is asked again after a second, so the first key made by `graft keys create`
# in another process turns authentication on within a second.
_with_keys: set[str] = set()
_keyless_until: dict[str, float] = {}
KEYLESS_RECHECK_S = 1.0


def _database(session: Session) -> str:
    return str(session.get_bind().url)


def any_keys(session: Session) -> bool:
    database = _database(session)
    if database in _with_keys:
        return True
    if time.monotonic() < _keyless_until.get(database, 0.0):
        return False
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        _with_keys.add(database)
        return True
    _keyless_until[database] = time.monotonic() + KEYLESS_RECHECK_S
    return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authenticate(session: Session, host: str, key: str | None) -> str:
    """The caller's owner name. With no keys at all and a loopback-only server, auth is off
    and everything belongs to the single local user."""
    if key:
        owner = owner_of(session, key)
        if owner is None:
            raise Unauthorized("the API key is unknown or revoked")
        return owner
    if is_loopback(host) and not any_keys(session):
        return LOCAL_OWNER
    raise Unauthorized(
        "an API key is required: Authorization: Bearer <key> "
        "(create one with `graft keys create --owner NAME`)"
    )
