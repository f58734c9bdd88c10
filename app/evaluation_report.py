"""An evaluation's report: the versions side by side, as a self-contained HTML page and a PNG.

The page shows, per version, accuracy and macro F1, accuracy on the baseline's labels and on
the others; per label, recall and F1 of every version; every pair's paired comparison (the
accuracy difference on the same images, what changed, the exact McNemar test, Holm-adjusted);
the confusion matrices next to each other; and the images whose prediction changed. Every
figure says how many images it rests on and its 95 % interval.
"""

from __future__ import annotations

import html
import io
from typing import Any

from app.reports import STYLE, confusion_html, estimate
from app.schemas import EvaluationRead

CHANGED_ROWS = 50  # images listed per pair on the page


def accuracy_text(figure: dict[str, Any]) -> str:
    """``figure``: {accuracy, n, ci95}; the overall figure keeps its interval in ci95.accuracy."""
    ci = figure.get("ci95")
    ci = ci.get("accuracy") if isinstance(ci, dict) else ci
    return estimate(figure.get("accuracy"), ci, figure.get("n"))


def difference_text(diff: dict[str, Any]) -> str:
    value, ci = diff.get("value"), diff.get("ci95")
    if value is None:
        return "–"
    text = f"{100 * value:+.1f} pts"
    return text + (f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else "")


def version_cells(v: dict[str, Any]) -> list[str]:
    """One version's row: accuracy, macro F1, on the baseline's labels, on the others, images
    it could not score (the page's and the terminal's table)."""
    return [
        f"v{v['version']}",
        accuracy_text(v["overall"]),
        estimate(v["overall"].get("macro_f1")),
        accuracy_text(v["old_labels"]),
        accuracy_text(v["new_labels"]),
        str(v["unscored"]["n"]),
    ]


def _rows(cells: list[list[str]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells)


def _per_label(versions: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(label for v in versions for label in v["per_class"]))
    head = "".join(f"<th>v{v['version']} recall</th><th>v{v['version']} F1</th>" for v in versions)
    rows = []
    for label in labels:
        cells = [html.escape(label)]
        for v in versions:
            row = v["per_class"].get(label)
            if row is None:
                cells += ["not a label", ""]
                continue
            ci = row.get("ci95") or {}
            cells.append(estimate(row["recall"], ci.get("recall"), row["support"]))
            cells.append(estimate(row["f1"], ci.get("f1"), row["support"]))
        rows.append(cells)
    return f'<table id="labels"><tr><th>label</th>{head}</tr>{_rows(rows)}</table>'


def render_html(evaluation: EvaluationRead) -> str:
    r = evaluation.result or {}
    versions, pairs = r.get("versions", []), r.get("comparisons", [])
    numbers = ", ".join(str(v["version"]) for v in versions)
    title = f"{evaluation.model}: versions {numbers} on dataset {evaluation.dataset_id}"
    summary = _rows([version_cells(v) for v in versions])
    compared = _rows(
        [
            [
                f"v{p['a']} → v{p['b']}",
                str(p["n"]),
                difference_text(p["difference"]),
                str(p["gained"]),
                str(p["lost"]),
                str(p["changed"]["n"]),
                f"{p['p_value']:.3g} / {p['p_value_holm']:.3g}",
                html.escape(p["summary"]),
            ]
            for p in pairs
        ]
    )
    matrices = "".join(
        f"<div><h3>v{v['version']}</h3>{confusion_html(v['confusion_matrix'])}</div>"
        for v in versions
    )
    changed = "".join(_changed(p) for p in pairs)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in evaluation.warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Graft evaluation: {html.escape(title)}</title>
{STYLE}
<style>.side {{ display: flex; gap: 1.5rem; flex-wrap: wrap; }} h3 {{ font-size: 1rem; }}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{f"<ul id='warnings'>{warnings}</ul>" if warnings else ""}
<h2>Versions</h2>
<table id="versions"><tr><th>version</th><th>accuracy</th><th>macro F1</th>
<th>baseline's labels (v{r.get("baseline_version", "?")})</th><th>other labels</th>
<th>images not scored</th></tr>{summary}</table>
<h2>Pairs, on the images both versions can score</h2>
<table id="pairs"><tr><th>pair</th><th>images</th><th>accuracy difference</th>
<th>wrong → right</th><th>right → wrong</th><th>predictions changed</th>
<th>McNemar p / Holm</th><th>verdict</th></tr>{compared}</table>
<h2>Per label</h2>
{_per_label(versions)}
<h2>Confusion matrices</h2>
<div class="side">{matrices}</div>
{changed}
<p><small>Evaluation {html.escape(evaluation.id)} · {r.get("images", {}).get("n", 0)} images;
intervals are 95 % (Wilson for accuracy, precision and recall; Bayesian bootstrap for F1 and
differences); p-values are exact McNemar tests, Holm-adjusted over the pairs.</small></p>
</body></html>
"""


def _changed(pair: dict[str, Any]) -> str:
    images = pair["changed"]["images"][:CHANGED_ROWS]
    if not images:
        return ""
    rows = _rows(
        [
            [html.escape(i["path"]), html.escape(i["label"]), html.escape(i["a"]),
             html.escape(i["b"])]
            for i in images
        ]
    )  # fmt: skip
    more = pair["changed"]["n"] - len(images)
    return (
        f"<h2>Changed predictions, v{pair['a']} → v{pair['b']}</h2>"
        f"<table><tr><th>image</th><th>label</th><th>v{pair['a']}</th><th>v{pair['b']}</th>"
        f"</tr>{rows}</table>" + (f"<p>and {more} more</p>" if more > 0 else "")
    )


def render_png(evaluation: EvaluationRead) -> bytes:
    """Per-label recall of every version side by side, with 95 % intervals, and each
    version's accuracy (drawn on a figure of its own, never pyplot: see app.reports)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    versions = (evaluation.result or {}).get("versions", [])
    labels = list(dict.fromkeys(label for v in versions for label in v["per_class"]))
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax_labels, ax_overall = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2, 1]})
    xs = np.arange(len(labels))
    width = 0.8 / max(len(versions), 1)
    for k, v in enumerate(versions):
        values, low, high = [], [], []
        for label in labels:
            row = v["per_class"].get(label) or {}
            value = row.get("recall")
            ci = (row.get("ci95") or {}).get("recall") or [value or 0, value or 0]
            values.append(value or 0)
            low.append(max(0.0, (value or 0) - ci[0]))
            high.append(max(0.0, ci[1] - (value or 0)))
        offset = (k - (len(versions) - 1) / 2) * width
        ax_labels.bar(xs + offset, values, width, yerr=[low, high], label=f"v{v['version']}")
    ax_labels.set_xticks(xs, labels, rotation=45, ha="right")
    ax_labels.set_ylim(0, 1.05)
    ax_labels.set_title("Recall per label (95 % intervals)")
    ax_labels.legend(loc="lower right")
    names = [f"v{v['version']}" for v in versions]
    acc = [v["overall"].get("accuracy") or 0 for v in versions]
    cis = [
        v["overall"].get("ci95", {}).get("accuracy") or [a, a]
        for v, a in zip(versions, acc, strict=True)
    ]
    pairs = list(zip(acc, cis, strict=True))
    errors = [[a - c[0] for a, c in pairs], [c[1] - a for a, c in pairs]]
    ax_overall.barh(names, acc, xerr=errors, color="tab:blue")
    ax_overall.set_xlim(0, 1.05)
    ns = [v["overall"].get("n", 0) for v in versions]
    for y, (a, n) in enumerate(zip(acc, ns, strict=True)):
        ax_overall.text(min(a, 0.8) + 0.02, y, f"{100 * a:.1f}% (n={n})", va="center")
    ax_overall.set_title("Accuracy on the images each version can score")
    fig.suptitle(f"{evaluation.model}: evaluation {evaluation.id}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
