"""Measure a layer by cross-fitting, in the folds of the base version's lineage.

The layer is fitted on every image; each image is scored, before and after, by layers that never
saw it: "after" by the job's refit without its fold, "before" by the base version's layer for
that fold (its own layer, when the base keeps no fold layers and never saw the image). Images
the base saw in every fold are trained on and not measured. Plain tensors in, figures out: the
engine's jobs and bench/quality.py's simulations run the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.evaluate import expansion_metrics
from engine.hygiene import likely_mislabeled
from engine.lineage import NEVER, Lineage, assign_folds
from engine.recipe import Fitted, LayerRecipe, Rows
from engine.train import linear_logits


@dataclass(frozen=True)
class Measured:
    layer: Fitted  # the calibrated layer, fitted on every image
    metrics: dict  # expansion_metrics' figures, the calibration, what they rest on
    lineage: Lineage  # the new version's: its fold layers and every image's fold
    groups: torch.Tensor  # the images measured


def cross_fit(
    recipe: LayerRecipe,
    rows: Rows,
    clean_rows: torch.Tensor,
    targets: torch.Tensor,
    digests: list[str],
    labels: list[str],
    base: Lineage,
    folds: int,
    seed: int,
    together: list[list[int]] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_fold: Callable[[int, int], None] | None = None,
    describe: Callable[[int], dict] = lambda g: {},
) -> Measured:
    """``rows`` hold every image's views; image ``g`` is labelled ``targets[g]``, known by
    ``digests[g]``, and its clean view is row ``clean_rows[g]``. ``folds`` is the base's when
    it keeps fold layers (they anchor the refits), else the job's. ``together``: groups of
    near-duplicate images, kept in one fold. ``describe(g)`` names image ``g`` in the list of
    likely mislabeled images."""
    num_old = recipe.num_old
    if base.has_layers:
        folds = base.folds
    fold_of = assign_folds(targets, digests, base.fold_of, folds, seed, together)
    anchors = [base.layer(k) for k in range(folds)] if base.has_layers else None
    cross = recipe.fit(rows, folds, on_epoch, on_fold, fold_of=fold_of, anchors=anchors)
    groups = cross.groups
    before = torch.empty(len(groups), dtype=torch.long)
    for k in range(folds):  # each image scored by the base layer that never saw it
        mask = fold_of[groups] == k
        w, b = anchors[k] if anchors else (recipe.old_weight, recipe.old_bias)
        if bool(mask.any()):
            before[mask] = linear_logits(rows.x, w, b, clean_rows[groups[mask]]).argmax(dim=1)
    measured = targets[groups]
    metrics = expansion_metrics(measured, before, cross.predicted, labels, num_old, seed)
    seen = sum(
        1
        for d, f in zip(digests, fold_of.tolist(), strict=True)
        if d in base.fold_of and f == NEVER
    )
    metrics["lineage"] = {
        "folds": folds,
        "base_fold_layers": anchors is not None,
        "seen_by_base": seen,  # trained on, not measured: the base saw them in every fold
        "near_duplicate_groups": len(together or []),
        "near_duplicate_images": sum(len(g) for g in together or []),
        # new labels with no more images than folds: each fold layer that scores one of their
        # images was fitted on one image fewer than the version (their last is never held out)
        "few_shot": {
            labels[c]: int((targets == c).sum())
            for c in range(num_old, len(labels))
            if bool(((targets == c) & (fold_of == NEVER)).any())
        },
    }
    metrics["calibration"] = cross.layer.choice.as_metrics() | {"before_finetune": False}
    metrics["label_issues"] = likely_mislabeled(
        cross.logits, measured, labels, lambda i: describe(int(groups[i]))
    )
    lineage = Lineage(
        folds,
        torch.stack([w for w, _ in cross.fold_layers]),
        torch.stack([b for _, b in cross.fold_layers]),
        base.fold_of | dict(zip(digests, fold_of.tolist(), strict=True)),
    )
    return Measured(cross.layer, metrics, lineage, groups)
