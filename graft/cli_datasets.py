"""graft dataset: push, list and show labelled image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from graft.client import GraftError
from graft.console import (
    EXIT_JOB_FAILED,
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

dataset_app = typer.Typer(help="Labelled image folders.", no_args_is_help=True)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def default_name(source: Path) -> str:
    """A pushed dataset's name when none is given: its folder's or its archive's name."""
    name = source.resolve().name
    for suffix in ARCHIVE_SUFFIXES:
        if source.is_file() and name.lower().endswith(suffix):
            return name[: -len(suffix)][:200] or name[:200]
    return name[:200]


@dataset_app.command("push")
def dataset_push(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="an ImageFolder, or a .zip, .tar or .tar.gz of one; or images already in S3: "
            "s3://bucket/prefix/ (one folder per label under it), copied in by the server",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="a name to know it by; default: the folder's or archive's name"
        ),
    ] = None,
    manifest: Annotated[
        bool,
        typer.Option(
            "--manifest",
            metavar="",
            help="SOURCE is an s3:// CSV of uri,label lines rather than a prefix",
        ),
    ] = False,
) -> None:
    """Upload labelled images (one folder per label), or register images already in a bucket
    the server may import from (GRAFT_IMPORT_BUCKETS) and wait while it copies them."""
    by_reference = source.startswith("s3://")
    if manifest and not by_reference:
        err.print("[red]error:[/red] --manifest takes an s3:// address")
        raise typer.Exit(EXIT_USAGE)
    if not by_reference and not Path(source).exists():
        err.print(f"[red]error:[/red] {escape(source)} does not exist")
        raise typer.Exit(EXIT_USAGE)
    try:
        if by_reference:
            dataset = _imported(client().import_dataset(source, manifest=manifest, name=name))
        else:
            dataset = client().push_dataset(Path(source), name or default_name(Path(source)))
    except GraftError as exc:
        fail(exc)
    if dataset.status == "failed":
        error = dataset.error
        err.print(f"[red]import of {dataset.id} failed[/red]: {error.code}: {error.message}")
        raise typer.Exit(EXIT_JOB_FAILED)
    table = Table("label", "images", title=f"dataset {dataset.id}")
    for label, count in dataset.labels.items():
        table.add_row(label, str(count))
    out.print(table)
    for rejected in dataset.rejected[:20]:
        err.print(f"[yellow]skipped[/yellow] {escape(rejected.path)}: {escape(rejected.reason)}")
    print(dataset.id)


def _imported(dataset: Any) -> Any:
    """Wait for an import with a progress bar; the dataset once ready or failed."""
    err.print(f"importing dataset {dataset.id} from {dataset.source.uri}")
    columns = (TextColumn("{task.description:<34}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("importing", total=1.0)

        def show(current: Any) -> None:
            p = current.progress
            bar.update(task, completed=p.fraction if p else 0.0, description=p.message if p else "")

        return client().wait_dataset(dataset.id, on_progress=show)


@dataset_app.command("list")
def dataset_list(output: ListOutput = Output.table) -> None:
    """List datasets, with their labels and image counts."""
    try:
        datasets = client().list_json("/v1/datasets")
    except GraftError as exc:
        fail(exc)
    if output == Output.json:
        print_json(datasets)
        return
    rows = [
        [
            d["id"],
            d.get("name") or "",
            ", ".join(d.get("labels", {})),
            str(d.get("num_images", "")),
            d.get("created_at", "")[:16].replace("T", " "),
        ]
        for d in datasets
    ]
    print_table(("id", "name", "labels", "images", "created"), rows, whole=("id",))


@dataset_app.command("show")
def dataset_show(
    dataset_id: Annotated[
        str, typer.Argument(metavar="ID", help="the dataset's id, as dataset push prints it")
    ],
    output: ShowOutput = Output.table,
) -> None:
    """A dataset's labels, image counts and skipped files."""
    try:
        dataset = client().get_json(f"/v1/datasets/{dataset_id}")
    except GraftError as exc:
        fail(exc)
    if output == Output.json:
        print_json(dataset)
        return
    rows = [[label, str(count)] for label, count in dataset.get("labels", {}).items()]
    print_table(("label", "images"), rows, whole=("label",), title=f"dataset {dataset['id']}")
    for rejected in dataset.get("rejected", [])[:20]:
        err.print(escape(f"skipped {rejected.get('path')}: {rejected.get('reason')}"))
