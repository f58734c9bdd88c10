"""Checks on requests Graft makes on a user's behalf (webhooks), against SSRF."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from app.auth import is_loopback
from app.settings import Settings


def private_targets_allowed(settings: Settings) -> bool:
    allowed = settings.webhook_allow_private
    return is_loopback(settings.host) if allowed is None else allowed


def refused_destination(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be called, or None. Every address the host resolves to is checked
    at delivery time, so a name cannot be pointed at an internal service later (SSRF)."""
    if private_targets_allowed(settings):
        return None
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global:
            return f"{host} resolves to the non-public address {ip}"
    return None
