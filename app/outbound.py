"""Checks on requests Graft makes on a user's behalf (webhooks), against SSRF."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from app.auth import is_loopback
from core.settings import Settings


def private_targets_allowed(settings: Settings) -> bool:
    allowed = settings.webhook_allow_private
    return is_loopback(settings.host) if allowed is None else allowed


@dataclass(frozen=True)
class Destination:
    """Where a request goes: ``url`` names the checked address itself, so the name is not
    resolved again on connecting (a name that rebinds in between reaches nothing new);
    ``host`` is the Host header and the TLS server name."""

    url: str
    host: str


def refused_destination(url: str, settings: Settings) -> str | None:
    """Why ``url`` may not be called, or None."""
    checked = destination(url, settings)
    return checked if isinstance(checked, str) else None


def destination(url: str, settings: Settings) -> Destination | str:
    """The address to call for ``url``, or why it may not be called. Every address the host
    resolves to is checked at delivery time, so a name cannot be pointed at an internal
    service later (SSRF), and the request goes to the address that was checked."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or None, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        return f"cannot resolve {host}: no address"
    if not private_targets_allowed(settings):
        for ip in addresses:
            if not ip.is_global:
                return f"{host} resolves to the non-public address {ip}"
    ip = addresses[0]
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = literal + (f":{parts.port}" if parts.port else "")
    header = parts.netloc.rpartition("@")[2]
    return Destination(urlunsplit(parts._replace(netloc=netloc)), header)
