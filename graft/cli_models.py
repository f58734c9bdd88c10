"""graft model: push, list, show, pull, reference, promote and delete models and versions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from app.reports import summary_rows
from app.schemas import ARTIFACT_SUFFIXES
from graft.client import GraftError
from graft.console import (
    EXIT_USAGE,
    ListOutput,
    Output,
    ShowOutput,
    client,
    err,
    fail,
    out,
    print_json,
    print_table,
)

model_app = typer.Typer(help="Models and their versions.", no_args_is_help=True)


@model_app.command("push")
def model_push(
    name: Annotated[str, typer.Argument(help="the model's name: a-z, 0-9, '.', '_' and '-'")],
    weights: Annotated[
        Path,
        typer.Option(
            exists=True,
            metavar="PATH",
            help=".safetensors or .pt; for hf: models, the save_pretrained folder (or its zip)",
        ),
    ],
    architecture: Annotated[
        str,
        typer.Option(
            "--arch",
            metavar="ARCH",
            help="timm:NAME, torchvision:NAME, hf:CLASS, keras:NAME or onnx:NAME",
        ),
    ],
    labels: Annotated[
        str,
        typer.Option(metavar="LABELS", help="a JSON file, or labels separated by commas"),
    ],
    preprocessing: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            metavar="FILE",
            help="a JSON file: input_size, mean, std (default: the architecture's own)",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(metavar="ID", help="a dataset id: images of the model's labels to keep"),
    ] = None,
) -> None:
    """Register a trained classifier as version 1 of NAME (optionally with a reference set)."""
    label_list = (
        json.loads(Path(labels).read_text())
        if Path(labels).is_file()
        else [x.strip() for x in labels.split(",") if x.strip()]
    )
    prep = json.loads(preprocessing.read_text()) if preprocessing else None
    try:
        version = client().register_model(
            name, architecture, label_list, weights, prep, reference_dataset_id=reference
        )
    except GraftError as exc:
        fail(exc)
    kept = sum(version.reference.values())
    out.print(
        f"[green]registered[/green] {version.name} v{version.version}: "
        f"{version.num_classes} labels, {version.architecture}"
        + (f", reference set of {kept} images" if kept else "")
    )


@model_app.command("list")
def model_list(output: ListOutput = Output.table) -> None:
    """List models."""
    try:
        if output == Output.json:
            print_json(client().list_json("/v1/models"))
            return
        models = client().list_models()
    except GraftError as exc:
        fail(exc)
    rows = [
        [m.name, str(m.latest_version), str(len(m.versions)), f"{m.created_at:%Y-%m-%d %H:%M}"]
        for m in models
    ]
    print_table(("name", "latest", "versions", "created"), rows, whole=("name",))


@model_app.command("show")
def model_show(
    ref: Annotated[str, typer.Argument(help="NAME for its versions, NAME@VERSION for one")],
    output: ShowOutput = Output.table,
) -> None:
    """A model's versions, or one version: status, reference set, headline metrics."""
    name, _, number = ref.partition("@")
    path = f"/v1/models/{name}" + (f"/versions/{_number(number)}" if number else "")
    try:
        if output == Output.json:
            print_json(client().get_json(path))
            return
        if number:
            show_version(client().get_version(name, _number(number)))
            return
        model = client().get_model(name)
    except GraftError as exc:
        fail(exc)
    rows = [
        [
            f"{v.version}{' (latest)' if v.version == model.latest_version else ''}",
            str(v.parent_version or ""),
            v.status,
            str(v.num_classes),
            f"{v.reference_images} images" if v.reference_images else "none",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        ]
        for v in model.versions
    ]
    headers = ("version", "parent", "status", "classes", "reference", "created")
    print_table(headers, rows, whole=("version",), title=model.name)
    for p in model.promotions[:5]:
        why = f": {p.reason}" if p.reason else ""
        out.print(
            f"v{p.version} promoted on purpose by {p.actor} at {p.created_at:%Y-%m-%d %H:%M} "
            f"(latest was v{p.previous_version}, v{p.version} was {p.previous_status}){why}"
        )


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        err.print(f"[red]error:[/red] VERSION must be a number, got {escape(repr(text))}")
        raise typer.Exit(EXIT_USAGE) from None


def show_version(version: Any) -> None:
    out.print(
        f"{version.name} v{version.version}: {version.status}, {version.num_classes} labels, "
        f"parent {version.parent_version or '-'}, {version.architecture}"
    )
    if version.metrics:
        table = Table("measure", "value")
        for row in summary_rows(version.metrics):
            table.add_row(*row)
        out.print(table)
    if version.reference:
        table = Table("label", "images", title="reference set")
        for label, count in version.reference.items():
            table.add_row(label, str(count))
        out.print(table)
    else:
        out.print(
            "no reference set: jobs built on this version measure retention only on old-label "
            f"images they upload (add one: graft model reference {version.name}@"
            f"{version.version} --dataset ID)"
        )


@model_app.command("reference")
def model_reference(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    dataset: Annotated[
        str, typer.Option(metavar="ID", help="a dataset id, as graft dataset push prints it")
    ],
) -> None:
    """Add a dataset's images of the version's labels to its reference set."""
    name, _, number = ref.partition("@")
    try:
        answer = client().add_reference(name, _number(number), dataset)
    except GraftError as exc:
        fail(exc)
    table = Table("label", "images", "added", title=f"{name} v{answer.version} reference set")
    for label, count in answer.reference.items():
        table.add_row(label, str(count), str(answer.added.get(label, 0)))
    out.print(table)
    if answer.ignored_labels:
        err.print(
            f"[yellow]ignored[/yellow] folders that are not its labels: {answer.ignored_labels}"
        )


@model_app.command(
    "promote",
    help="Make a version the latest on purpose: promote an unverified or rejected one, or roll "
    "back to an older one.",
)
def model_promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[
        str | None, typer.Option(metavar="TEXT", help="recorded with the promotion")
    ] = None,
) -> None:
    name, _, number = ref.partition("@")
    try:
        model = client().promote(name, _number(number), reason)
    except GraftError as exc:
        fail(exc)
    last = model.promotions[0]
    out.print(
        f"[green]{name}: latest is v{model.latest_version}[/green] "
        f"(was v{last.previous_version}; recorded as done by {last.actor})"
    )


@model_app.command(
    "pull",
    help="Download a version, checking its sha256. It is saved as NAME-vVERSION.EXT in the "
    "current folder or the folder -o names (never over an existing file unless --force), or "
    "as the file -o names.",
)
def model_pull(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, or NAME for the latest version")],
    format: Annotated[
        str,
        typer.Option(
            metavar="FORMAT",
            help="safetensors, onnx, torchscript, keras, or hf (a Hugging Face model's folder, "
            "zipped)",
        ),
    ] = "safetensors",
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            metavar="FILE|DIR",
            help="the file to save it as (replaced if it exists), or an existing folder to "
            "save NAME-vVERSION.EXT in; default: NAME-vVERSION.EXT in the current folder, e.g. "
            "digits-v2.onnx",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", metavar="", help="replace the default file if it exists already"),
    ] = False,
) -> None:
    name, _, version = ref.partition("@")
    graft = client()
    try:
        number = _number(version) if version else graft.get_model(name).latest_version
        if number is None:
            err.print(f"[red]error:[/red] {name} has no promoted version: pull NAME@VERSION")
            raise typer.Exit(EXIT_USAGE)
        named = Path(f"{name}-v{number}{ARTIFACT_SUFFIXES.get(format, '.' + format)}")
        folder = output if output is not None and output.is_dir() else None
        dest = folder / named if folder else output or named
        if (output is None or folder) and not force and dest.exists():
            err.print(
                f"[red]error:[/red] {escape(str(dest))} exists already: --force replaces it, "
                "-o FILE saves it elsewhere"
            )
            raise typer.Exit(EXIT_USAGE)
        # a bar on a terminal; piped, nothing (not even the blank line a bar leaves)
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        with bar:
            task = bar.add_task(f"{name} v{number}", total=None)
            graft.download(
                name,
                number,
                dest,
                format,
                on_bytes=lambda done, total: bar.update(task, completed=done, total=total or None),
            )
    except GraftError as exc:
        fail(exc)
    out.print(
        f"[green]saved[/green] {escape(str(dest))} ({dest.stat().st_size:,} bytes, sha256 verified)"
    )


def _confirm(question: str, yes: bool) -> None:
    """Ask on a terminal (not in a script, nor with --yes); exit 1 unless the answer is yes."""
    if yes or not sys.stdin.isatty():
        return
    if not typer.confirm(question, default=False, err=True):
        err.print("nothing deleted")
        raise typer.Exit(1)


@model_app.command(
    "delete",
    help="Delete a model with all its versions, or one version (--version, or NAME@VERSION). "
    "The API refuses a model with a job queued or running, and the last promoted version of a "
    "model that has other versions, unless --force. On a terminal it asks first (--yes does "
    "not); what is deleted is printed.",
)
def model_delete(
    ref: Annotated[str, typer.Argument(help="NAME, or NAME@VERSION for one version")],
    version: Annotated[
        int | None, typer.Option(metavar="N", help="delete this version only")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            metavar="",
            help="delete even a model with a job queued or running, or the last promoted "
            "version of a model with other versions",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", metavar="", help="do not ask first on a terminal")
    ] = False,
) -> None:
    name, _, number = ref.partition("@")
    if number and version is not None:
        err.print("[red]error:[/red] give the version once: NAME@VERSION or --version")
        raise typer.Exit(EXIT_USAGE)
    if number:
        version = _number(number)
    graft = client()
    try:
        if version is None:
            model = graft.get_model(name)
            live = sum(1 for v in model.versions if getattr(v, "deleted_at", None) is None)
            what = f"model {name} and its {live} version{'s' * (live != 1)}"
            _confirm(f"delete {what}?", yes)
            graft.delete_model(name, force=force)
            gone = len(model.versions) - live
            before = f" (and the records of {gone} deleted before)" if gone else ""
            out.print(f"deleted {what}{before}")
        else:
            _confirm(f"delete {name} v{version} and its files?", yes)
            graft.delete_version(name, version, force=force)
            out.print(f"deleted {name} v{version}")
    except GraftError as exc:
        forceable = exc.status == 409 and not force and "force" in exc.detail
        again = f"graft model delete {name}{f'@{version}' if version is not None else ''} --force"
        fail(exc, f"to do that here: {again}" if forceable else "")
