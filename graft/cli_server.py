"""The server commands: serve, api and worker (registered on the root command in
graft.cli), db upgrade and keys create|list|revoke."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from graft.console import Output, err, print_json

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
log = logging.getLogger("graft")


def serve() -> None:
    """Migrate, then run the API and a worker together (the embedded default)."""
    from graft.server import serve as run

    settings = _settings()
    _serving("the API and a worker", settings)
    run(settings)


def api() -> None:
    """Run the HTTP API only."""
    from graft.server import run_api

    settings = _settings()
    _serving("the API", settings)
    run_api(settings)


def _serving(what: str, settings: Any) -> None:
    from app import __version__
    from core.logs import describe

    if taken := port_taken(settings.host, settings.port):
        err.print(
            f"[red]error:[/red] {settings.host}:{settings.port} is taken ({taken}), by another "
            "graft serve perhaps. Serve on another port with GRAFT_PORT=8001, and give a "
            "second server its own data with GRAFT_DATA_DIR=./var2"
        )
        raise typer.Exit(2)

    log.info(
        "Graft %s: starting %s on http://%s:%s; %s",
        __version__,
        what,
        settings.host,
        settings.port,
        describe(settings),
    )


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (checked before anything starts), or None."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def worker() -> None:
    """Run one worker (one job at a time; one per GPU)."""
    from graft.server import run_worker

    run_worker(_settings())


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[
        str, typer.Option(metavar="REVISION", help="the migration to stop at; head: the newest")
    ] = "head",
) -> None:
    """Apply database migrations (safe to repeat)."""
    from core.migrate import db_upgrade as upgrade

    upgrade(_settings(), revision)


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(metavar="OWNER", help="who the key's resources belong to")],
) -> None:
    """Create an API key. It is printed once and not stored."""
    from app import auth

    with _session() as session:
        key, row = auth.create_key(session, owner)
    print(key)
    err.print(
        f"owner {row.owner}, prefix {row.prefix}: keep the key now, it is not stored "
        "and cannot be shown again"
    )


@keys_app.command("list")
def keys_list(
    output: Annotated[
        Output,
        typer.Option(
            "--output",
            metavar="[table|json]",
            help="table, or json: one JSON array of {prefix, owner, created_at, revoked_at}",
        ),
    ] = Output.table,
) -> None:
    """List keys (prefixes and owners; keys themselves are never stored)."""
    from app import auth

    with _session() as session:
        rows = auth.list_keys(session)
        if output == Output.json:
            print_json(
                [
                    {
                        "prefix": row.prefix,
                        "owner": row.owner,
                        "created_at": row.created_at.isoformat(),
                        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
                    }
                    for row in rows
                ]
            )
            return
        for row in rows:
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.prefix}  {row.owner:<20} {row.created_at:%Y-%m-%d}  {state}")


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="the key's prefix, as keys list shows it")],
) -> None:
    """Revoke a key by its prefix."""
    from app import auth

    with _session() as session:
        row = auth.revoke_key(session, prefix)
    print(f"revoked {row.prefix} ({row.owner})")


def _settings() -> Any:
    from core.logs import configure_logging
    from core.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _session() -> Any:
    from core.db import session_scope
    from core.migrate import db_upgrade as upgrade

    settings = _settings()
    upgrade(settings)
    return session_scope(settings.resolved_database_url)
