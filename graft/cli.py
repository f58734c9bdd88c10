"""The ``graft`` command: run the service, and use it.

Server:   graft serve | api | worker | db upgrade | keys create/list/revoke
Client:   graft model push/list/show/pull/reference/promote | dataset push |
          job submit/list/show/watch/cancel

The client commands talk to ``GRAFT_URL`` (default http://127.0.0.1:8000) with
``GRAFT_API_KEY``. Exit codes: 0 done, 1 the job failed or was cancelled, 2 bad usage,
3 the API refused the request, 4 the API could not be reached.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.reports import summary_rows
from app.schemas import ARTIFACT_SUFFIXES
from graft.client import FINAL, Client, GraftError

app = typer.Typer(
    help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)
model_app = typer.Typer(help="Models and their versions.", no_args_is_help=True)
dataset_app = typer.Typer(help="Labelled image folders.", no_args_is_help=True)
job_app = typer.Typer(help="Label-expansion jobs.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
for sub, name in (
    (model_app, "model"),
    (dataset_app, "dataset"),
    (job_app, "job"),
    (db_app, "db"),
    (keys_app, "keys"),
):
    app.add_typer(sub, name=name)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 3, 4
# Share of the whole job each stage stands for, to draw one bar with an honest ETA.
STAGES = {
    "queued": (0.0, 0.0),
    "loading": (0.0, 0.05),
    "extracting": (0.05, 0.6),
    "training": (0.6, 0.9),
    "evaluating": (0.9, 0.95),
    "exporting": (0.95, 1.0),
    "done": (1.0, 1.0),
}


def client() -> Client:
    return Client()


def fail(exc: GraftError) -> None:
    err.print(f"[red]error:[/red] {exc.detail}")
    for problem in exc.problem.get("errors", [])[:10]:
        err.print(f"  {problem.get('field')}: {problem.get('message')}")
    raise typer.Exit(EXIT_UNREACHABLE if exc.status == 0 else EXIT_REFUSED)


# Server -------------------------------------------------------------------------------------


@app.command()
def serve() -> None:
    """Migrate, then run the API and a worker together (the embedded default)."""
    from app.server import serve as run

    run(_settings())


@app.command()
def api() -> None:
    """Run the HTTP API only."""
    from app.server import run_api

    run_api(_settings())


@app.command()
def worker() -> None:
    """Run one worker (one job at a time; one per GPU)."""
    from app.server import run_worker

    run_worker(_settings())


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply database migrations (safe to repeat)."""
    from app.server import db_upgrade as upgrade

    upgrade(_settings(), revision)


@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="who the key's resources belong to")],
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
def keys_list() -> None:
    """List keys (prefixes and owners; keys themselves are never stored)."""
    from app import auth

    with _session() as session:
        for row in auth.list_keys(session):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.prefix}  {row.owner:<20} {row.created_at:%Y-%m-%d}  {state}")


@keys_app.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its prefix."""
    from app import auth

    with _session() as session:
        row = auth.revoke_key(session, prefix)
    print(f"revoked {row.prefix} ({row.owner})")


def _settings() -> Any:
    from app.logs import configure_logging
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _session() -> Any:
    from app.db import session_scope
    from app.server import db_upgrade as upgrade

    settings = _settings()
    upgrade(settings)
    return session_scope(settings.resolved_database_url)


# Models -------------------------------------------------------------------------------------


@model_app.command("push")
def model_push(
    name: str,
    weights: Annotated[
        Path,
        typer.Option(
            exists=True,
            help=".safetensors or .pt; for hf: models, the save_pretrained folder (or its zip)",
        ),
    ],
    architecture: Annotated[
        str, typer.Option("--arch", help="timm:NAME, torchvision:NAME or hf:CLASS")
    ],
    labels: Annotated[str, typer.Option(help="a JSON file, or labels separated by commas")],
    preprocessing: Annotated[Path | None, typer.Option(exists=True, help="a JSON file")] = None,
    reference: Annotated[
        str | None, typer.Option(help="a dataset id: images of the model's labels to keep")
    ] = None,
) -> None:
    """Register a trained classifier as version 1 of NAME (with a reference set)."""
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
def model_list() -> None:
    """List models."""
    try:
        models = client().list_models()
    except GraftError as exc:
        fail(exc)
    table = Table("name", "latest", "versions", "created")
    for m in models:
        table.add_row(
            m.name, str(m.latest_version), str(len(m.versions)), f"{m.created_at:%Y-%m-%d %H:%M}"
        )
    out.print(table)


@model_app.command("show")
def model_show(
    ref: Annotated[str, typer.Argument(help="NAME for its versions, NAME@VERSION for one")],
) -> None:
    """A model's versions, or one version: status, reference set, headline metrics."""
    name, _, number = ref.partition("@")
    try:
        if number:
            show_version(client().get_version(name, _number(number)))
            return
        model = client().get_model(name)
    except GraftError as exc:
        fail(exc)
    table = Table(
        "version", "parent", "status", "classes", "reference", "created", title=model.name
    )
    for v in model.versions:
        latest = " (latest)" if v.version == model.latest_version else ""
        table.add_row(
            f"{v.version}{latest}",
            str(v.parent_version or ""),
            v.status,
            str(v.num_classes),
            f"{v.reference_images} images" if v.reference_images else "none",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)
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
        err.print(f"[red]error:[/red] VERSION must be a number, got {text!r}")
        raise typer.Exit(2) from None


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
    dataset: Annotated[str, typer.Option(help="a dataset id from `graft dataset push`")],
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


@model_app.command("promote")
def model_promote(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[str | None, typer.Option(help="recorded with the promotion")] = None,
) -> None:
    """Make a version the latest on purpose: promote an unverified or rejected one, or roll
    back to an older one."""
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


@model_app.command("pull")
def model_pull(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, or NAME for the latest version")],
    format: Annotated[
        str,
        typer.Option(
            help="safetensors, onnx, torchscript, or hf (a Hugging Face model's folder, zipped)"
        ),
    ] = "safetensors",
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
) -> None:
    """Download a version, checking its sha256."""
    name, _, version = ref.partition("@")
    graft = client()
    try:
        number = _number(version) if version else graft.get_model(name).latest_version
        dest = output or Path(f"{name}-v{number}{ARTIFACT_SUFFIXES.get(format, '.' + format)}")
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            console=err,
            transient=True,
        ) as bar:
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
    out.print(f"[green]saved[/green] {dest} ({dest.stat().st_size:,} bytes, sha256 verified)")


# Datasets -----------------------------------------------------------------------------------


@dataset_app.command("push")
def dataset_push(
    source: Annotated[Path, typer.Argument(exists=True, help="an ImageFolder, or an archive")],
    name: str | None = None,
) -> None:
    """Upload labelled images: one folder per label."""
    try:
        dataset = client().push_dataset(source, name)
    except GraftError as exc:
        fail(exc)
    table = Table("label", "images", title=f"dataset {dataset.id}")
    for label, count in dataset.labels.items():
        table.add_row(label, str(count))
    out.print(table)
    for rejected in dataset.rejected[:20]:
        err.print(f"[yellow]skipped[/yellow] {rejected.path}: {rejected.reason}")
    print(dataset.id)


# Jobs ---------------------------------------------------------------------------------------


@job_app.command("submit")
def job_submit(
    model: Annotated[str, typer.Option(help="the model to grow")],
    dataset: Annotated[str, typer.Option(help="a dataset id from `graft dataset push`")],
    new_label: Annotated[
        list[str] | None, typer.Option(help="default: the dataset's new labels")
    ] = None,
    base_version: int | None = None,
    config: Annotated[str | None, typer.Option(help="JSON, e.g. '{\"epochs\": 50}'")] = None,
    notify_url: Annotated[str | None, typer.Option(help="POSTed the job when it ends")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="follow it to the end")] = False,
) -> None:
    """Teach MODEL the new labels of DATASET."""
    try:
        job = client().submit_job(
            model,
            dataset,
            new_labels=new_label or None,
            base_version=base_version,
            config=json.loads(config) if config else None,
            notify_url=notify_url,
        )
    except GraftError as exc:
        fail(exc)
    err.print(
        f"submitted job {job.id}: {job.model} v{job.base_version} + {', '.join(job.new_labels)}"
    )
    for warning in job.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if watch:
        follow(job.id, shown=set(job.warnings))
    else:
        print(job.id)


@job_app.command("watch")
def job_watch(job_id: str) -> None:
    """Follow a job with a progress bar, then show its metrics."""
    follow(job_id)


def follow(job_id: str, shown: Collection[str] = ()) -> None:
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(compact=True),
    )
    try:
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("queued", total=1.0)

            def show(job: Any) -> None:
                start, end = STAGES.get(job.progress.stage, (0.0, 1.0))
                done = start + (end - start) * job.progress.fraction
                epoch = (
                    f" epoch {job.progress.epoch}/{job.progress.epochs}"
                    if job.progress.epoch
                    else ""
                )
                bar.update(task, completed=done, description=f"{job.progress.stage}{epoch}")

            job = client().wait(job_id, on_progress=show)
    except GraftError as exc:
        fail(exc)
    report(job, shown)
    if job.status != "succeeded":
        raise typer.Exit(EXIT_JOB_FAILED)


def report(job: Any, shown: Collection[str] = ()) -> None:
    if job.status != "succeeded":
        detail = f": {job.error.code}: {job.error.message}" if job.error else ""
        err.print(f"[red]job {job.id} {job.status}[/red]{detail}")
        return
    m = job.metrics
    table = Table("measure", "value", title=f"{job.model} v{job.result.version}")
    for row in summary_rows(m):
        table.add_row(*row)
    out.print(table)
    gate = m.get("gate", {})
    colour = {"promoted": "green", "rejected": "red"}.get(gate.get("decision", ""), "yellow")
    out.print(f"[{colour}]{gate.get('reason', '')}[/{colour}]")
    for warning in job.warnings:
        if warning not in shown:
            err.print(f"[yellow]warning:[/yellow] {warning}")
    if gate.get("decision") == "unverified":
        name, base, version = job.model, job.base_version, job.result.version
        out.print(
            f"to measure it: graft model reference {name}@{base} --dataset ID, then submit "
            f"again; to use it anyway: graft model promote {name}@{version}"
        )


@job_app.command("list")
def job_list(status: str | None = None, model: str | None = None) -> None:
    """List jobs, newest first."""
    try:
        jobs = client().list_jobs(status, model)
    except GraftError as exc:
        fail(exc)
    table = Table("id", "model", "status", "stage", "new labels", "result", "created")
    for j in jobs:
        result = f"v{j.result.version}" if j.result else ""
        table.add_row(
            j.id,
            f"{j.model} v{j.base_version}",
            j.status,
            j.progress.stage,
            ", ".join(j.new_labels),
            result,
            f"{j.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)


@job_app.command("show")
def job_show(job_id: str) -> None:
    """A job's status and metrics."""
    try:
        job = client().get_job(job_id)
    except GraftError as exc:
        fail(exc)
    if job.status in FINAL:
        report(job)
    else:
        out.print(
            f"{job.id}: {job.status}, {job.progress.stage} "
            f"{100 * job.progress.fraction:.0f}% {job.progress.message}"
        )


@job_app.command("cancel")
def job_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    try:
        job = client().cancel_job(job_id)
    except GraftError as exc:
        fail(exc)
    out.print(f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'cancelling'}")


def main() -> None:
    app(prog_name="graft")


if __name__ == "__main__":
    sys.exit(main())
