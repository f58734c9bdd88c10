"""The recipe for the classifier layer on cached features, reusable on any subset of them.

``LayerRecipe.fit(rows)`` is everything that turns labelled feature rows into a layer: new rows
imprinted, trained (see ``train``), then calibrated against the old classes on logits of images
the rows never saw (inner cross-fitting). Because it is one function of its rows, the same
recipe can be refitted without some images to score them honestly (outer cross-fitting, see
``crossfit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.calibrate import Calibration, Choice, Pool, calibrate, fold_into_layer
from worker.engine.train import (
    HeadTraining,
    calibrate_new_bias,
    imprint_rows,
    linear_logits,
    train_head,
)

FEW_SHOT = 2  # a new label with at most this many images is imprinted, not trained


@dataclass(frozen=True)
class Rows:
    """Feature rows: ``x[index]`` labelled ``y``, each the view of image ``group``; ``clean``
    marks the unaugmented view of every image."""

    x: torch.Tensor
    y: torch.Tensor
    group: torch.Tensor
    clean: torch.Tensor
    index: torch.Tensor | None = None  # None: every row of x

    def subset(self, keep: torch.Tensor) -> Rows:
        """The rows where ``keep`` (a mask over these rows) is true."""
        where = keep.nonzero().flatten()
        index = where if self.index is None else self.index[where]
        return Rows(self.x, self.y[where], self.group[where], self.clean[where], index)

    def logits(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return linear_logits(self.x, weight, bias, self.index)


@dataclass(frozen=True)
class Fitted:
    weight: torch.Tensor
    bias: torch.Tensor
    choice: Choice
    history: list[dict]


class LayerRecipe:
    """Imprinted new rows with a calibrated bias, trained (old rows fixed unless configured
    otherwise), then corrected by ``calibrate``. A new label with only ``FEW_SHOT`` images or
    fewer keeps its imprinted row: on one or two images gradient steps only memorise them.
    Which labels those are is decided once, on all images, so that every refit on a subset
    follows the same recipe."""

    def __init__(
        self,
        old_weight: torch.Tensor,
        old_bias: torch.Tensor,
        new_classes: list[int],
        init: str,
        training: HeadTraining,
        calibration: Calibration,
        should_stop: Callable[[], bool] = lambda: False,
        has_bias: bool = True,
        images: torch.Tensor | None = None,
    ) -> None:
        """``images``: images per class (all labels); None leaves every row trainable."""
        self.old_weight, self.old_bias, self.has_bias = old_weight, old_bias, has_bias
        self.num_old, self.new_classes = len(old_bias), new_classes
        self.init, self.training, self.calibration = init, training, calibration
        self.should_stop = should_stop
        few_shot = init == "imprint" and images is not None
        self.imprinted = [c for c in new_classes if int(images[c]) <= FEW_SHOT] if few_shot else []

    def fit(self, rows: Rows, on_epoch: Callable[[dict], None] | None = None) -> Fitted:
        weight, bias, history = self.fit_rows(rows, on_epoch)
        pool = self._pool(rows, weight, bias)
        choice = calibrate(weight, self.num_old, pool, self.calibration, shift=self.has_bias)
        weight, bias = fold_into_layer(weight, bias, self.num_old, choice.alpha, choice.beta)
        return Fitted(weight, bias, choice, history)

    def fit_rows(
        self, rows: Rows, on_epoch: Callable[[dict], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """The layer before calibration."""
        num_old, new = self.num_old, self.new_classes
        zeros = torch.zeros(len(new), self.old_weight.shape[1])
        weight = torch.cat([self.old_weight, zeros])
        bias = torch.cat([self.old_bias, torch.zeros(len(new))])
        x, y, index = rows.x, rows.y, rows.index
        if self.init == "imprint":
            weight[num_old:] = imprint_rows(x, y, new, weight[:num_old], index)
            if self.has_bias:
                bias[num_old:] = calibrate_new_bias(x, y, weight, bias, num_old, new, index)
        else:
            generator = torch.Generator().manual_seed(self.training.seed)
            std = weight[:num_old].std().item()
            weight[num_old:] = torch.randn(zeros.shape, generator=generator) * std
        if not self.trains(y):
            return weight, bias, []
        return train_head(
            weight,
            bias,
            x,
            y,
            num_old,
            self.training,
            on_epoch=on_epoch,
            should_stop=self.should_stop,
            index=index,
            train_bias=self.has_bias,
            fixed=self.imprinted,
        )

    def trains(self, y: torch.Tensor) -> bool:
        """Gradient steps need epochs, negatives (old-class images) and a label with more
        than a few shots."""
        if self.training.epochs <= 0 or not bool((y < self.num_old).any()):
            return False
        return len(self.imprinted) < len(self.new_classes)

    def _pool(self, rows: Rows, weight: torch.Tensor, bias: torch.Tensor) -> Pool:
        """Held-out logits to calibrate on: every clean image scored by rows refitted without
        it (views of an image held out together). A new label with no held-out image at all
        is represented by its images scored in-sample."""
        cal = self.calibration
        num_classes = weight.shape[0]
        pools = []
        if cal.fits_on_pool and cal.folds > 1 and len(rows.y):
            fold_of = image_folds(rows, cal.folds, self.training.seed)
            for fold in range(cal.folds):
                held = fold_of == fold
                if not held.any():
                    continue
                w, b, _ = self.fit_rows(rows.subset(~held))
                scored = rows.subset(held & rows.clean)
                pools.append(Pool(scored.logits(w, b), scored.y))
        pool = Pool.concat(pools, num_classes)
        missing = [c for c in self.new_classes if not bool((pool.targets == c).any())]
        if missing:
            seen = rows.subset(rows.clean & torch.isin(rows.y, torch.tensor(missing)))
            pool = Pool.concat([pool, Pool(seen.logits(weight, bias), seen.y)], num_classes)
        return pool


def image_folds(rows: Rows, folds: int, seed: int) -> torch.Tensor:
    """The fold of every row, -1 for rows never held out; all views of an image share one."""
    clean = rows.subset(rows.clean)
    fold_of_group = _folds(clean.y, clean.group, folds, seed)
    return fold_of_group[rows.group]


def _folds(targets: torch.Tensor, groups: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold of every image (indexed by group), -1 for never held out: dealt round-robin within
    each class so that every fold holds every class; a class keeps an image to train on in
    every fold (its row needs one)."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.full((int(groups.max()) + 1 if len(groups) else 0,), -1)
    for c in targets.unique().tolist():
        members = groups[targets == c]
        members = members[torch.randperm(len(members), generator=generator)]
        for i, g in enumerate(members.tolist()):
            if len(members) > folds:
                fold_of[g] = i % folds
            elif i < len(members) - 1:
                fold_of[g] = i
    return fold_of


def out_of_fold(
    recipe: LayerRecipe,
    rows: Rows,
    folds: int,
    seed: int,
    on_fold: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(groups, predicted)``: every image that can be held out, predicted by the recipe
    refitted without it. An image that is its label's only one cannot be held out (the
    label's row needs it) and is left out."""
    fold_of = image_folds(rows, folds, seed)
    groups, predicted = [], []
    for fold in range(folds):
        held = fold_of == fold
        if held.any():
            fitted = recipe.fit(rows.subset(~held))
            scored = rows.subset(held & rows.clean)
            groups.append(scored.group)
            predicted.append(scored.logits(fitted.weight, fitted.bias).argmax(dim=1))
        if on_fold:
            on_fold(fold + 1, folds)
    if not groups:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(groups), torch.cat(predicted)
