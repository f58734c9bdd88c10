"""graft model gate NAME: the gate's settings for a model's jobs, shown or changed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from graft.cli_models import model_app
from graft.client import GraftError
from graft.console import client, fail, out

SETTINGS = (  # option, setting, what it means
    ("min_retention", "the share of old-class accuracy a version should keep"),
    ("margin", "promoted when a retention below min_retention - margin is ruled out"),
    ("min_images", "old-label images needed to measure retention at all"),
    ("label_max_drop", "a drop of one old label's recall that counts as a collapse"),
    ("new_label_min_recall", "each new label must beat this, and chance, with evidence"),
    ("alpha", "family-wise error of the per-label checks"),
)


@model_app.command("gate")
def model_gate(
    name: Annotated[str, typer.Argument(help="the model's name")],
    min_retention: Annotated[
        float | None, typer.Option(metavar="SHARE", help=SETTINGS[0][1] + " (0.98)")
    ] = None,
    margin: Annotated[
        float | None, typer.Option(metavar="SHARE", help=SETTINGS[1][1] + " (0.03)")
    ] = None,
    min_images: Annotated[
        int | None, typer.Option(metavar="N", help=SETTINGS[2][1] + " (20)")
    ] = None,
    label_max_drop: Annotated[
        float | None, typer.Option(metavar="SHARE", help=SETTINGS[3][1] + " (0.10)")
    ] = None,
    new_label_min_recall: Annotated[
        float | None, typer.Option(metavar="SHARE", help=SETTINGS[4][1] + " (0.10)")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(metavar="P", help=SETTINGS[5][1] + " (0.05)")
    ] = None,
) -> None:
    """Show the gate's settings for a model's jobs, or set them: the options given replace
    the model's settings, the others take the defaults. A job's config.gate still overrides
    them; versions already decided keep their decision."""
    given = {
        "min_retention": min_retention,
        "margin": margin,
        "min_images": min_images,
        "label_max_drop": label_max_drop,
        "new_label_min_recall": new_label_min_recall,
        "alpha": alpha,
    }
    given = {k: v for k, v in given.items() if v is not None}
    try:
        model = client().set_gate(name, given) if given else client().get_model(name)
    except GraftError as exc:
        fail(exc)
    table = Table("setting", "value", "what it does", title=f"{name}: the gate")
    for setting, meaning in SETTINGS:
        table.add_row(setting, str(model.gate.get(setting, "")), meaning)
    out.print(table)
