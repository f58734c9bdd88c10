"""Reports to look at: a self-contained HTML page and a PNG of a finished job.

Both show the same four things: what happened to each old class (accuracy before and after),
how well the new classes are recognised (precision and recall), the confusion matrix, and the
training curve. Every figure says how many images it rests on and its 95 % interval; images are
scored by a layer that never saw them (cross-fitting), or held out (fine-tuned backbones).
"""

from __future__ import annotations

import html
import io
from typing import Any

from app.schemas import JobRead

STYLE = """<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; }
td, th { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th { background: #f5f5f5; text-align: left; }
.badge { display: inline-block; padding: .15rem .6rem; border-radius: 1rem; color: #fff; }
.promoted { background: #2b8a3e; } .rejected { background: #c92a2a; }
.unverified { background: #e67700; } .held { background: #1971c2; }
.confusion td { min-width: 2rem; text-align: center; }
</style>"""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def estimate(value: float | None, ci: list[float] | None = None, n: int | None = None) -> str:
    """``98.1% (96.7–99.0, n=540)``: a figure with its 95 % interval and its evidence."""
    if value is None:
        return "–" if n is None else f"– (n={n})"
    parts = []
    if ci:
        parts.append(f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}")
    if n is not None:
        parts.append(f"n={n}")
    return f"{100 * value:.1f}%" + (f" ({', '.join(parts)})" if parts else "")


def measured_on(metrics: dict[str, Any]) -> str:
    """What the figures rest on, e.g. ``540 old (480 from the reference set) / 15 new images,
    5-fold cross-fitting``."""
    m = metrics.get("measurement")
    old_n = metrics.get("old_classes", {}).get("n", 0)
    new_n = metrics.get("new_classes", {}).get("n", 0)
    if not m:
        return f"{old_n} old / {new_n} new held-out images"
    how = (
        f"{m['folds']}-fold cross-fitting" if m["method"] == "cross_fitted" else "a held-out split"
    )
    ref = m["measured"].get("from_reference", 0)
    source = f" ({ref} from the reference set)" if ref else ""
    few = m.get("few_shot") or {}
    fewer = (
        "; "
        + ", ".join(f"{label!r} ({n} images)" for label, n in few.items())
        + " scored by layers fitted on one image fewer than the version"
        if few
        else ""
    )
    return f"{old_n} old{source} / {new_n} new images, {how}{fewer}"


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline figures of a job, as (measure, value) rows."""
    old, new = metrics.get("old_classes", {}), metrics.get("new_classes", {})
    overall = metrics.get("overall", {})
    ci_old, ci_new = old.get("ci95") or {}, new.get("ci95") or {}
    n_old = old.get("n")
    changed = old.get("paired") or {}
    gate = metrics.get("gate", {})
    p_value = gate.get("mcnemar_p")
    timing = metrics.get("timing", {})
    kept = sum((metrics.get("reference", {}).get("kept") or {}).values())
    return [
        ("decision", _decision(metrics)),
        (
            "old-class accuracy before",
            estimate(old.get("accuracy_before"), ci_old.get("accuracy_before"), n_old),
        ),
        (
            "old-class accuracy after",
            estimate(old.get("accuracy_after"), ci_old.get("accuracy_after"), n_old),
        ),
        ("retention", estimate(old.get("retention"), ci_old.get("retention"), n_old)),
        (
            "old images lost / gained",
            f"{changed['lost']} / {changed['gained']}"
            + (f" (McNemar p={p_value:.3g})" if p_value is not None else "")
            if changed
            else "–",
        ),
        (
            "unchanged old predictions",
            estimate(old.get("prediction_agreement"), ci_old.get("prediction_agreement"), n_old),
        ),
        ("new-class accuracy", estimate(new.get("accuracy"), ci_new.get("accuracy"), new.get("n"))),
        (
            "overall accuracy / macro F1",
            estimate(
                overall.get("accuracy"),
                (overall.get("ci95") or {}).get("accuracy"),
                overall.get("n"),
            )
            + f" / {_pct(overall.get('macro_f1'))}",
        ),
        ("measured on", measured_on(metrics)),
        ("reference set kept", f"{kept} images"),
        ("new-class calibration", calibration_summary(metrics)),
        ("time", f"{timing.get('total_s', 0):.1f} s on {metrics.get('device')}"),
    ]


def _decision(metrics: dict[str, Any]) -> str:
    gate = metrics.get("gate", {})
    evidence = gate.get("evidence")
    if gate.get("decision") == "unverified":
        return "unverified (retention not measured)"
    if evidence in ("strong", "weak"):
        return f"{verdict(metrics)} ({evidence} evidence)"
    return f"{verdict(metrics)} ({evidence})" if evidence else verdict(metrics)


def verdict(metrics: dict[str, Any]) -> str:
    gate = metrics.get("gate", {})
    return gate.get("decision") or ("promoted" if gate.get("passed", True) else "rejected")


def calibration_summary(metrics: dict[str, Any]) -> str:
    """One line on how the new logits were corrected, e.g. ``bias correction: 0.75 z - 1.20``."""
    cal = metrics.get("calibration")
    if not cal:
        return "–"
    pool = cal.get("pool", {})
    after = ", before fine-tuning" if cal.get("before_finetune") else ""
    if cal.get("limited"):
        after += "; only lowered: too few held-out images of a new label to favour it"
    evidence = f"{pool.get('old', 0)} old / {pool.get('new', 0)} new held-out images{after}"
    if cal["method"] == "none":
        return f"none: the layer as fitted (checked on {evidence})"
    alpha, beta = cal["alpha"], cal["beta"]
    if isinstance(alpha, list) or isinstance(beta, list):  # a brake per new label
        labels = (metrics.get("confusion_matrix") or {}).get("labels") or []
        values = alpha if isinstance(alpha, list) else beta
        rest = 1.0 if isinstance(alpha, list) else 0.0
        names = labels[len(labels) - len(values) :] if labels else [str(i) for i in values]
        lowered = [
            f"{name!r} {value:+.2f}" if rest == 0.0 else f"{name!r} x{value:.2f}"
            for name, value in zip(names, values, strict=True)
            if value != rest
        ]
        return f"brake on {', '.join(lowered)}, other new labels as fitted (chosen on {evidence})"
    sign = "-" if beta < 0 else "+"
    method = cal["method"].replace("_", " ")
    return f"{method}: {alpha:.2f} z {sign} {abs(beta):.2f} (chosen on {evidence})"


def _curve_svg(history: list[dict[str, Any]], width: int = 560, height: int = 200) -> str:
    if not history:
        return (
            "<p>No epochs to draw: the layer was refitted as one convex problem, or the new "
            "rows were imprinted only.</p>"
        )
    pad = 30
    epochs = [h["epoch"] for h in history]
    losses = [h["train_loss"] for h in history]
    accs = [h["val_accuracy"] for h in history if h["val_accuracy"] is not None]
    top = max(losses) or 1.0

    def x(epoch: float) -> float:
        span = max(epochs[-1] - epochs[0], 1)
        return pad + (width - 2 * pad) * (epoch - epochs[0]) / span

    def y(value: float, scale: float) -> float:
        return height - pad - (height - 2 * pad) * value / scale

    loss_points = " ".join(
        f"{x(e):.1f},{y(v, top):.1f}" for e, v in zip(epochs, losses, strict=True)
    )
    acc_points = " ".join(
        f"{x(h['epoch']):.1f},{y(h['val_accuracy'], 1.0):.1f}"
        for h in history
        if h["val_accuracy"] is not None
    )
    last = f"{100 * accs[-1]:.1f}%" if accs else "–"
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="training curve">'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
        f'fill="#fafafa" stroke="#ccc"/>'
        f'<polyline points="{loss_points}" fill="none" stroke="#d9480f" stroke-width="2"/>'
        f'<polyline points="{acc_points}" fill="none" stroke="#1c7ed6" stroke-width="2"/>'
        f'<text x="{pad}" y="18" font-size="12" fill="#d9480f">training loss '
        f"(max {top:.3f})</text>"
        f'<text x="{width // 2}" y="18" font-size="12" fill="#1c7ed6">validation accuracy '
        f"(last {last})</text>"
        f'<text x="{width - pad}" y="{height - 8}" font-size="11" text-anchor="end">'
        f"epoch {epochs[-1]}</text></svg>"
    )


def confusion_html(confusion: dict[str, Any]) -> str:
    labels, matrix = confusion["labels"], confusion["matrix"]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for label, row in zip(labels, matrix, strict=True):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            correct = labels[j] == label
            color = f"rgba(28,126,214,{share:.2f})" if correct else f"rgba(224,49,49,{share:.2f})"
            cells.append(f'<td style="background:{color}">{count or ""}</td>')
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="confusion"><tr><th>true \\ predicted</th>{head}</tr>{"".join(rows)}</table>'
    )


def render_html(job: JobRead) -> str:
    m = job.metrics or {}
    per_class = m.get("per_class", {})
    before = m.get("old_classes", {}).get("recall_before", {})
    gate = m.get("gate", {})
    decision = verdict(m)
    title = (
        f"{job.model} v{job.base_version} → v{job.result.version if job.result else '?'} "
        f"+ {', '.join(job.new_labels)}"
    )

    def ci(label: str, figure: str) -> list[float] | None:
        return (per_class.get(label, {}).get("ci95") or {}).get(figure)

    def cell(label: str, figure: str, n_key: str) -> str:
        stats = per_class.get(label, {})
        value = stats.get(figure) if figure != "recall_before" else before.get(label)
        return f"<td>{estimate(value, ci(label, figure), stats.get(n_key))}</td>"

    old_rows = "".join(
        f"<tr><td>{html.escape(label)}</td>{cell(label, 'recall_before', 'support')}"
        f"{cell(label, 'recall', 'support')}"
        f"<td>{per_class.get(label, {}).get('support', 0)}</td></tr>"
        for label in before
    )
    new_rows = "".join(
        f"<tr><td>{html.escape(label)}</td>{cell(label, 'precision', 'predicted')}"
        f"{cell(label, 'recall', 'support')}"
        f"<td>{per_class.get(label, {}).get('support', 0)}</td></tr>"
        for label in job.new_labels
    )
    summary_html = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(m)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Graft report: {html.escape(title)}</title>
{STYLE}</head><body>
<h1>{html.escape(title)}</h1>
<p><span class="badge {decision}" id="verdict">{decision}</span>
{html.escape(gate.get("reason", ""))}</p>
{_next_steps_html(gate)}
<table id="summary">{summary_html}</table>
<h2>Old classes: accuracy before and after</h2>
<table id="old-classes"><tr><th>label</th><th>before</th><th>after</th><th>images</th></tr>
{old_rows}</table>
<h2>New classes</h2>
<table id="new-classes"><tr><th>label</th><th>precision</th><th>recall</th><th>images</th></tr>
{new_rows}</table>
{_label_issues_html(m.get("label_issues") or {})}
<h2>Confusion matrix (every measured image)</h2>
{confusion_html(m["confusion_matrix"]) if "confusion_matrix" in m else ""}
<h2>Training</h2>
{_curve_svg(m.get("history", []))}
<p><small>Job {html.escape(job.id)} · measured on {html.escape(measured_on(m))}; intervals
are 95 %.</small></p>
</body></html>
"""


def _next_steps_html(gate: dict[str, Any]) -> str:
    steps = gate.get("next_steps") or []
    if not steps:
        return ""
    items = "".join(f"<li>{html.escape(step)}</li>" for step in steps)
    return f'<p>What would change the decision:</p><ul id="next-steps">{items}</ul>'


def _label_issues_html(issues: dict[str, Any]) -> str:
    """The images whose label the layers that never saw them doubt (confident learning)."""
    if not issues.get("count"):
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(i.get('file') or i['digest'][:16])}</td>"
        f"<td>{html.escape(i['label'])}</td><td>{html.escape(i['looks_like'])}</td>"
        f"<td>{100 * i['confidence']:.0f}%</td></tr>"
        for i in issues["images"]
    )
    return (
        f"<h2>Likely mislabeled ({issues['count']} of {issues['checked']} images)</h2>"
        "<p>Images the layers that never saw them confidently put in another label: look at "
        "them, and move or remove the wrong ones.</p>"
        '<table id="label-issues"><tr><th>image</th><th>labelled</th><th>looks like</th>'
        f"<th>confidence</th></tr>{rows}</table>"
    )


def render_png(job: JobRead) -> bytes:
    """The report's charts as one PNG (matplotlib, no display needed)."""
    buffer = io.BytesIO()
    report_figure(job).savefig(buffer, format="png")
    return buffer.getvalue()


def report_figure(job: JobRead) -> Any:
    """The report's charts, as a matplotlib Figure.

    Drawn on a figure of its own with the object-oriented API, never pyplot: renders run at
    the same time in the API's thread pool, and pyplot's current figure and backend are one
    global state for the whole process."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = job.metrics or {}
    per_class = m.get("per_class", {})
    before = m.get("old_classes", {}).get("recall_before", {})
    fig = Figure(figsize=(12, 9), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself: the figure draws with Agg, whatever the backend
    axes = fig.subplots(2, 2)
    (ax_old, ax_new), (ax_cm, ax_curve) = axes

    old = list(before)
    _paired_bars(
        ax_old,
        old,
        ("before", [before[k] for k in old]),
        ("after", [per_class.get(k, {}).get("recall") for k in old]),
        "Old classes: accuracy before / after",
    )
    new = job.new_labels
    _paired_bars(
        ax_new,
        new,
        ("precision", [per_class.get(k, {}).get("precision") for k in new]),
        ("recall", [per_class.get(k, {}).get("recall") for k in new]),
        "New classes",
    )

    if "confusion_matrix" in m:
        cm = np.array(m["confusion_matrix"]["matrix"], dtype=float)
        shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax_cm.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ticks = m["confusion_matrix"]["labels"]
        ax_cm.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right")
        ax_cm.set_yticks(range(len(ticks)), ticks)
        ax_cm.set_xlabel("predicted")
        ax_cm.set_ylabel("true")
        ax_cm.set_title(f"Confusion matrix ({measured_on(m)})", fontsize=9)

    history = m.get("history", [])
    if history:
        epochs = [h["epoch"] for h in history]
        ax_curve.plot(epochs, [h["train_loss"] for h in history], label="training loss")
        twin = ax_curve.twinx()
        twin.plot(
            epochs,
            [h["val_accuracy"] or 0 for h in history],
            color="tab:orange",
            label="validation accuracy",
        )
        twin.set_ylim(0, 1.05)
        ax_curve.set_xlabel("epoch")
        ax_curve.legend(loc="upper left")
        twin.legend(loc="lower left")
        ax_curve.set_title("Training")
    else:  # a head fitted in closed form: there is no curve to draw
        ax_curve.axis("off")
        ax_curve.text(
            0.5, 0.5, "No epochs to draw:\nthe classifier was fitted without them",
            ha="center", va="center", fontsize=11,
        )  # fmt: skip
    fig.suptitle(f"{job.model} v{job.base_version} + {', '.join(job.new_labels)}")
    fig.tight_layout()
    return fig


def _paired_bars(
    axis: Any, labels: list[str], left: tuple[str, list], right: tuple[str, list], title: str
) -> None:
    """Two bars per label, values in [0, 1] (None drawn as 0)."""
    import numpy as np

    xs = np.arange(len(labels))
    for offset, (name, values) in ((-0.2, left), (0.2, right)):
        axis.bar(xs + offset, [v or 0 for v in values], 0.4, label=name)
    axis.set_xticks(xs, labels, rotation=45, ha="right")
    # the axis starts a little below the lowest bar, so that a drop of a few points shows
    shown = [v for v in (*left[1], *right[1]) if v is not None]
    bottom = max(0.0, np.floor((min(shown, default=0.0) - 0.05) * 10) / 10)
    axis.set_ylim(bottom, 1.02)
    axis.set_title(title + (f" (axis from {bottom:.0%})" if bottom > 0 else ""))
    axis.legend(loc="lower right")
