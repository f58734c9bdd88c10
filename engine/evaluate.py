"""Metrics of an expansion. Every accuracy, recall and precision carries the number of images
it was counted on (``n``, ``support``, ``predicted``) and a Wilson 95 % interval (``ci95``);
retention carries the paired counts and a Bayesian-bootstrap interval (see ``evidence``)."""

from __future__ import annotations

import torch

from engine.evidence import paired, wilson


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[i, j]`` counts images of class ``i`` predicted as ``j``."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def classification_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, labels: list[str]) -> dict:
    """Accuracy, macro F1 over the classes present, per-class P/R/F1 and the confusion matrix."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    tp = matrix.diag()
    support = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    per_class = {}
    f1s = []
    for i, label in enumerate(labels):
        hits, n, chosen = int(tp[i]), int(support[i]), int(predicted[i])
        precision, recall = _ratio(hits, chosen), _ratio(hits, n)
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision and recall
            else (0.0 if n else None)
        )
        if n:
            f1s.append(f1 or 0.0)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": n,  # the n of recall
            "predicted": chosen,  # the n of precision
            "ci95": {"precision": wilson(hits, chosen), "recall": wilson(hits, n)},
        }
    right, total = int(tp.sum()), int(support.sum())
    return {
        "overall": {
            "accuracy": _ratio(right, total),
            "macro_f1": _ratio(sum(f1s), len(f1s)),
            "n": total,
            "ci95": {"accuracy": wilson(right, total)},
        },
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }


def expansion_metrics(
    y_true: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    labels: list[str],
    num_old: int,
    seed: int = 0,
) -> dict:
    """What the expansion did to the same images: old-class accuracy before and after (paired),
    how many old-class predictions stayed the same, and how well the new classes are
    recognised."""
    old = y_true < num_old
    new = ~old
    right_before = (before == y_true)[old]
    right_after = (after == y_true)[old]
    counts = paired(right_before.tolist(), right_after.tolist())
    n_old, n_new = counts.n, _count(new)
    agree = _count(after[old] == before[old])
    new_right = _count(after[new] == y_true[new])
    metrics = classification_metrics(y_true, after, labels)
    recall_before = {}
    for c in range(num_old):
        members = y_true == c
        hits, n = _count(before[members] == c), _count(members)
        recall_before[labels[c]] = _ratio(hits, n)
        row = metrics["per_class"][labels[c]]
        row["recall_before"] = _ratio(hits, n)
        row["ci95"]["recall_before"] = wilson(hits, n)
        # the label's own before/after pairs: what the gate's per-label check tests
        row["paired"] = paired(
            (before[members] == c).tolist(), (after[members] == c).tolist()
        ).as_dict()
    metrics["old_classes"] = {
        "accuracy_before": _ratio(counts.right_before, n_old),
        "accuracy_after": _ratio(counts.right_after, n_old),
        "retention": counts.retention,
        "prediction_agreement": _ratio(agree, n_old),
        "n": n_old,
        "paired": counts.as_dict() if n_old else None,
        "ci95": {
            "accuracy_before": wilson(counts.right_before, n_old),
            "accuracy_after": wilson(counts.right_after, n_old),
            "retention": counts.retention_interval(seed),
            "prediction_agreement": wilson(agree, n_old),
        },
        "recall_before": recall_before,
    }
    metrics["new_classes"] = {
        "accuracy": _ratio(new_right, n_new),
        "n": n_new,
        "ci95": {"accuracy": wilson(new_right, n_new)},
    }
    return metrics
