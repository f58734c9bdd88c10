"""The graft command: run the service (serve, api, worker, db, keys), and use it (model,
dataset, job). The help text is HELP below; ``graft --help`` prints it."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer
import typer.main

from graft import cli_gate  # noqa: F401 - adds `graft model gate`
from graft.cli_datasets import dataset_app
from graft.cli_jobs import evaluate, job_app
from graft.cli_models import model_app
from graft.cli_server import api, db_app, keys_app, serve, worker

HELP = (
    "Run the Graft service, and use it.\n\n"
    "Server: graft serve (the API and a worker together), graft api, graft worker, "
    "graft db upgrade, graft keys create|list|revoke.\n\n"
    "Client: graft model push|list|show|pull|reference|promote|gate|delete, "
    "graft dataset push|list|show, graft job submit|list|show|watch|cancel, "
    "graft eval (compare versions on a dataset). "
    "The client commands talk to GRAFT_URL "
    "(default http://127.0.0.1:8000) with the key in GRAFT_API_KEY.\n\n"
    "Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad usage, 3 the API refused "
    "the request, 4 the API could not be reached."
)
app = typer.Typer(
    help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
for sub, name in (
    (model_app, "model"),
    (dataset_app, "dataset"),
    (job_app, "job"),
    (db_app, "db"),
    (keys_app, "keys"),
):
    app.add_typer(sub, name=name)


def _print_version(asked: bool) -> None:
    if asked:
        from app import __version__  # noqa: PLC0415

        typer.echo(f"graft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


app.command()(serve)
app.command()(api)
app.command()(worker)
app.command("eval")(evaluate)


def tidy_help(command: Any) -> Any:
    """Help that reads as the user types it: options show a word (NAME, ID, FILE) or nothing
    (flags) where the help would show a Python type; arguments show their name (REF, not
    {ref}) and no type."""
    import typer._click.core as click_core

    if command.help:
        command.help = unwrap(command.help)
    for param in command.params:
        if isinstance(param, typer.core.TyperArgument):
            param.metavar = name = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None
            if param.required and param.nargs == 1:
                param._usage_display_name = lambda name=name: name
        elif param.metavar is None:
            param.metavar = "" if param.is_flag else param.name.upper()
    help_option = command.get_help_option(click_core.Context(command))
    if help_option is not None:
        help_option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)
    return command


def unwrap(text: str) -> str:
    """Help text whose paragraphs are each one line, for the terminal to wrap at its own width
    (a docstring's line breaks would otherwise break lines mid-sentence in narrower ones)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def command() -> Any:
    """The graft command, its help tidied (what ``main`` runs)."""
    return tidy_help(typer.main.get_command(app))


def main() -> None:
    command()(prog_name="graft")


if __name__ == "__main__":
    sys.exit(main())
