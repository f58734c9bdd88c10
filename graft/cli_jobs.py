"""graft job: submit, list, show, watch and cancel label-expansion jobs; and graft eval
(registered on the root command in graft.cli), which scores versions on a dataset."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from app.reports import summary_rows
from graft.client import FINAL, GraftError
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
from graft.evaluation_view import evaluation_tables, verdicts

job_app = typer.Typer(help="Label-expansion jobs.", no_args_is_help=True)

# An evaluation's stages: the backbone passes are nearly all of it.
EVALUATION_STAGES = {
    "queued": (0.0, 0.0),
    "loading": (0.0, 0.05),
    "extracting": (0.05, 0.95),
    "evaluating": (0.95, 1.0),
    "done": (1.0, 1.0),
}
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


@job_app.command("submit")
def job_submit(
    model: Annotated[str, typer.Option(metavar="NAME", help="the model to grow")],
    dataset: Annotated[
        str, typer.Option(metavar="ID", help="a dataset id, as graft dataset push prints it")
    ],
    new_label: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LABEL",
            help="a label to add (repeat for more); default: every label of the dataset the "
            "base version does not know",
        ),
    ] = None,
    base_version: Annotated[
        int | None,
        typer.Option(metavar="N", help="the version to grow; default: the latest promoted version"),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            metavar="JSON",
            help="the job's settings (POST /v1/jobs config), e.g. "
            '\'{"freeze": "last_block", "epochs": 20}\' to fine-tune the last block too',
        ),
    ] = None,
    notify_url: Annotated[
        str | None, typer.Option(metavar="URL", help="POSTed the job when it ends")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", metavar="", help="follow it to the end")
    ] = False,
) -> None:
    """Teach a model the new labels of a dataset: start a job (--watch follows it)."""
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


JobId = Annotated[
    str, typer.Argument(metavar="ID", help="the job's id, as job submit or job list shows it")
]


@job_app.command("watch")
def job_watch(job_id: JobId) -> None:
    """Follow a job with a progress bar, then show its metrics."""
    follow(job_id)


def follow(job_id: str, shown: Collection[str] = ()) -> None:
    job = wait_with_bar(job_id)
    report(job, shown)
    if job.status != "succeeded":
        raise typer.Exit(EXIT_JOB_FAILED)


def wait_with_bar(job_id: str) -> Any:
    """Wait for a job (or an evaluation) to end, drawing its progress; the final job."""
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
                stages = EVALUATION_STAGES if job.kind == "evaluate" else STAGES
                start, end = stages.get(job.progress.stage, (0.0, 1.0))
                done = start + (end - start) * job.progress.fraction
                epoch = (
                    f" epoch {job.progress.epoch}/{job.progress.epochs}"
                    if job.progress.epoch
                    else ""
                )
                bar.update(task, completed=done, description=f"{job.progress.stage}{epoch}")

            return client().wait(job_id, on_progress=show)
    except GraftError as exc:
        fail(exc)


def report(job: Any, shown: Collection[str] = ()) -> None:
    if job.status != "succeeded":
        detail = f": {job.error.code}: {job.error.message}" if job.error else ""
        what = "evaluation" if job.kind == "evaluate" else "job"
        err.print(f"[red]{what} {job.id} {job.status}[/red]{detail}")
        return
    if job.kind == "evaluate":
        try:
            show_evaluation(client().get_evaluation(job.id), shown)
        except GraftError as exc:
            fail(exc)
        return
    m = job.metrics
    table = Table("measure", "value", title=f"{job.model} v{job.result.version}")
    for row in summary_rows(m):
        table.add_row(*row)
    out.print(table)
    gate = m.get("gate", {})
    decision = gate.get("decision", "")
    colour = {"promoted": "green", "rejected": "red", "held": "blue"}.get(decision, "yellow")
    out.print(f"[{colour}]{gate.get('reason', '')}[/{colour}]")
    version = job.result.version
    outcome = f"version {version} is {decision}"
    for warning in job.warnings:
        if warning not in shown and not warning.startswith(outcome):
            err.print(f"[yellow]warning:[/yellow] {warning}")
    for line in next_steps(job.model, job.base_version, version, gate):
        out.print(line)


def next_steps(name: str, base: int, version: int, gate: dict[str, Any]) -> list[str]:
    """What to do after each outcome, in the CLI's own commands."""
    decision = gate.get("decision")
    steps = [f"  - {step}" for step in gate.get("next_steps") or []]
    if decision == "promoted":
        return [
            f"next: graft model pull {name}@{version} --format onnx; compare versions on "
            f"images no job saw: graft eval --model {name} --versions {base},{version} "
            "--dataset ID"
        ]
    lines = [f"{decision}: not made the latest. What would change it:", *steps]
    if decision in ("held", "unverified"):
        lines.append(
            f"  - add reference images: graft model reference {name}@{base} --dataset ID, "
            "then submit the job again"
        )
    lines.append(f"to use it anyway: graft model promote {name}@{version}")
    return lines


@job_app.command("list")
def job_list(
    status: Annotated[
        str | None,
        typer.Option(
            metavar="STATUS", help="only jobs queued, running, succeeded, failed or cancelled"
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(metavar="NAME", help="only this model's jobs")
    ] = None,
    output: ListOutput = Output.table,
) -> None:
    """List jobs, newest first."""
    params = {k: v for k, v in (("status", status), ("model", model)) if v}
    try:
        if output == Output.json:
            print_json(client().list_json("/v1/jobs", params))
            return
        jobs = client().list_jobs(status, model)
    except GraftError as exc:
        fail(exc)
    rows = [
        [
            j.id,
            f"{j.model} v{j.base_version}" if j.kind != "evaluate" else j.model,
            state_of(j),
            ", ".join(j.new_labels)
            if j.kind != "evaluate"
            else "evaluates " + ", ".join(f"v{n}" for n in j.config.get("versions", [])),
            f"{j.created_at:%m-%d %H:%M}",
        ]
        for j in jobs
    ]
    headers = ("id", "model", "state", "what", "created")
    print_table(headers, rows, whole=("id", "state", "created"))


def state_of(job: Any) -> str:
    """One word or two for where a job stands: its stage while it runs, and once it
    succeeded the version it made and what the gate decided (promoted, unverified, ...)."""
    if job.status == "running":
        return job.progress.stage
    if job.status == "succeeded" and job.result:
        return f"v{job.result.version} {job.result.gate or ''}".strip()
    if job.status == "succeeded" and job.kind == "evaluate":
        return "evaluated"
    return job.status


@job_app.command("show")
def job_show(job_id: JobId, output: ShowOutput = Output.table) -> None:
    """A job's status and metrics."""
    try:
        if output == Output.json:
            print_json(client().get_json(f"/v1/jobs/{job_id}"))
            return
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
def job_cancel(job_id: JobId) -> None:
    """Cancel a queued or running job."""
    try:
        job = client().cancel_job(job_id)
    except GraftError as exc:
        fail(exc)
    out.print(f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'cancelling'}")


# Evaluations --------------------------------------------------------------------------------


def evaluate(
    model: Annotated[str, typer.Option(metavar="NAME", help="the model whose versions to score")],
    versions: Annotated[
        str,
        typer.Option(
            metavar="N,N,...",
            help="the versions to score, e.g. 1,3; the first is the baseline (its labels are "
            "the old labels)",
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option(
            metavar="ID",
            help="a dataset id (graft dataset push prints it): labelled images that none of "
            "the versions was trained on",
        ),
    ],
    notify_url: Annotated[
        str | None, typer.Option(metavar="URL", help="POSTed the evaluation when it ends")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", metavar="", help="follow it, then show the figures")
    ] = False,
    output: ShowOutput = Output.table,
) -> None:
    """Score versions of a model on a labelled dataset, image by image.

    Accuracy and per-label figures with their intervals, and for each pair of versions the
    images that changed and a paired significance test. Prints the evaluation's id (--watch
    follows it; graft job show ID shows it later)."""
    try:
        numbers = [int(part) for part in versions.split(",") if part.strip()]
    except ValueError:
        err.print(f"[red]error:[/red] --versions takes numbers like 1,3, not {versions!r}")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        evaluation = client().evaluate(model, numbers, dataset, notify_url=notify_url)
    except GraftError as exc:
        fail(exc)
    listed = ", ".join(f"v{n}" for n in evaluation.versions)
    err.print(f"submitted evaluation {evaluation.id}: {evaluation.model} {listed}")
    for warning in evaluation.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    if not watch:
        print(evaluation.id)
        return
    job = wait_with_bar(evaluation.id)
    if output == Output.json:
        print_json(client().get_json(f"/v1/evaluations/{evaluation.id}"))
    else:
        report(job, shown=set(evaluation.warnings))
    if job.status != "succeeded":
        raise typer.Exit(EXIT_JOB_FAILED)


def show_evaluation(evaluation: Any, shown: Collection[str] = ()) -> None:
    for table in evaluation_tables(evaluation):
        out.print(table)
    for sentence in verdicts(evaluation):
        out.print(sentence)
    for warning in evaluation.warnings:
        if warning not in shown:
            err.print(f"[yellow]warning:[/yellow] {warning}")
    out.print(f"report: {client().url}/v1/evaluations/{evaluation.id}/report")
