"""What every graft command shares: the consoles it prints to, its exit codes, the --output
option, the API client, and how it reports the API's problems and prints JSON and tables."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graft.client import Client, GraftError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
EXIT_JOB_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 2, 3, 4


class Output(StrEnum):
    table = "table"
    json = "json"


ListOutput = Annotated[
    Output,
    typer.Option(
        "--output",
        metavar="[table|json]",
        help="table, or json: every item of every page, as the API sends them, in one JSON array",
    ),
]
ShowOutput = Annotated[
    Output,
    typer.Option(
        "--output", metavar="[table|json]", help="table, or json: the API's JSON as it sends it"
    ),
]


def client() -> Client:
    return Client()


# The API's words for what the CLI spells otherwise (its flags, its settings).
CLI_WORDS = {
    "new_labels": "--new-label",
    "base_version": "--base-version",
    "dataset_id": "--dataset",
    "notify_url": "--notify-url",
    "Authorization: Bearer <key>": "GRAFT_API_KEY",
}


def in_cli_words(text: str) -> str:
    """``text`` with the API's field and header names as the CLI's flags and settings."""
    for api, cli in CLI_WORDS.items():
        text = re.sub(rf"(?<![\w-]){re.escape(api)}(?![\w-])", cli, text)
    return text


def fail(exc: GraftError, hint: str = "") -> None:
    """Print the API's problem (its detail, then each field error the detail does not already
    say, once) and exit 3, or 4 when the API could not be reached."""
    detail = in_cli_words(str(exc.detail or exc.problem.get("title") or f"HTTP {exc.status}"))
    err.print(f"[red]error:[/red] {escape(detail)}")
    said = {detail}
    for problem in exc.problem.get("errors", [])[:10]:
        message = in_cli_words(str(problem.get("message", "")))
        if message in said or message in detail:
            continue
        said.add(message)
        field = CLI_WORDS.get(str(problem.get("field")), problem.get("field"))
        err.print(escape(f"  {field}: {message}" if field else f"  {message}"))
    if exc.status == 401:
        hint = hint or (
            "the CLI sends the key in GRAFT_API_KEY: set it to a key that "
            "`graft keys create --owner NAME` printed"
        )
    if hint:
        err.print(escape(hint))
    raise typer.Exit(EXIT_UNREACHABLE if exc.status == 0 else EXIT_REFUSED)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    whole: Collection[str] = ("id",),
    title: str | None = None,
) -> None:
    """A table whose ``whole`` columns (ids, names) are never cut: the other columns wrap to
    fit the terminal (or COLUMNS), drawn without column lines when boxed it would have to
    break words. Piped without COLUMNS, every row is one line."""
    widest = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]

    def build(light: bool) -> Table:
        table = (
            Table(title=title, box=None, padding=(0, 1), pad_edge=False, header_style="bold")
            if light
            else Table(title=title)
        )
        for i, header in enumerate(headers):
            if header in whole:
                table.add_column(header, no_wrap=True, min_width=widest[i])
            else:
                table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        return table

    table = build(light=False)
    wide = out.options.update_width(10_000)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        width = max(out.width, out.measure(table, options=wide).maximum)
    else:
        width = out.width
        if out.measure(table, options=wide).minimum > width:
            table = build(light=True)
    # the whole columns in full, and at least 4 characters for each of the others
    floor = sum(w if h in whole else 4 for h, w in zip(headers, widest, strict=True))
    width = max(width, floor + 3 * len(headers) + 1)
    # Console.print draws no wider than the console: a wider table needs a wider console
    (out if width <= out.width else Console(file=out.file, width=width)).print(table)
