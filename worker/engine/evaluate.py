"""Metrics of an expansion, measured on the held-out validation split."""

from __future__ import annotations

import torch


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``m[i, j]`` counts images of class ``i`` predicted as ``j``."""
    flat = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def classification_metrics(y_true: torch.Tensor, y_pred: torch.Tensor, labels: list[str]) -> dict:
    """Accuracy, macro F1 over the classes present, per-class P/R/F1 and the confusion matrix."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    tp = matrix.diag().float()
    support = matrix.sum(dim=1).float()
    predicted = matrix.sum(dim=0).float()
    per_class = {}
    f1s = []
    for i, label in enumerate(labels):
        precision = _ratio(tp[i].item(), predicted[i].item())
        recall = _ratio(tp[i].item(), support[i].item())
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision and recall
            else (0.0 if support[i] else None)
        )
        if support[i]:
            f1s.append(f1 or 0.0)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[i].item()),
        }
    return {
        "overall": {
            "accuracy": _ratio(tp.sum().item(), support.sum().item()),
            "macro_f1": _ratio(sum(f1s), len(f1s)),
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
) -> dict:
    """What the expansion did: old-class accuracy before and after, how many old-class
    predictions stayed the same, and how well the new classes are recognised."""
    old = y_true < num_old
    new = ~old
    acc_before = _ratio((before[old] == y_true[old]).sum().item(), old.sum().item())
    acc_after = _ratio((after[old] == y_true[old]).sum().item(), old.sum().item())
    metrics = classification_metrics(y_true, after, labels)
    per_class_before = {
        labels[c]: _ratio((before[y_true == c] == c).sum().item(), (y_true == c).sum().item())
        for c in range(num_old)
    }
    metrics["old_classes"] = {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "retention": _ratio(acc_after, acc_before) if acc_after is not None else None,
        "prediction_agreement": _ratio((after[old] == before[old]).sum().item(), old.sum().item()),
        "n": int(old.sum().item()),
        "recall_before": per_class_before,
    }
    metrics["new_classes"] = {
        "accuracy": _ratio((after[new] == y_true[new]).sum().item(), new.sum().item()),
        "n": int(new.sum().item()),
    }
    return metrics
