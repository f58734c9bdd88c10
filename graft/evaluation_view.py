"""An evaluation as the terminal shows it: the versions side by side, then every pair."""

from __future__ import annotations

from rich.table import Table

from app.evaluation_report import difference_text, version_cells
from app.schemas import EvaluationRead


def evaluation_tables(evaluation: EvaluationRead) -> list[Table]:
    """The versions (accuracy, macro F1, the baseline's labels, the others, images not
    scored) and the pairs (images, difference, wrong→right, right→wrong, p-values)."""
    result = evaluation.result or {}
    images = result.get("images", {}).get("n", 0)
    versions = Table(
        "version",
        "accuracy",
        "macro F1",
        f"v{result.get('baseline_version', '?')} labels",
        "other labels",
        "not scored",
        title=f"{evaluation.model} on dataset {evaluation.dataset_id} ({images} images)",
    )
    for v in result.get("versions", []):
        versions.add_row(*version_cells(v))
    pairs = Table(
        "pair",
        "images",
        "difference",
        "wrong→right",
        "right→wrong",
        "p (Holm)",
        title="each pair, on the images both can score",
    )
    for p in result.get("comparisons", []):
        pairs.add_row(
            f"v{p['a']} → v{p['b']}",
            str(p["n"]),
            difference_text(p["difference"]),
            str(p["gained"]),
            str(p["lost"]),
            f"{p['p_value_holm']:.3g}",
        )
    return [versions, pairs] if result.get("comparisons") else [versions]


def verdicts(evaluation: EvaluationRead) -> list[str]:
    """One sentence per pair: which version is better, by how much, and how sure."""
    return [p["summary"] for p in (evaluation.result or {}).get("comparisons", [])]
