"""The recipe for the classifier layer on cached features, and how it is measured.

``LayerRecipe.fit_rows`` turns labelled feature rows into a layer: new rows imprinted, then the
whole layer refitted (see ``refit``) or the new rows trained by epochs (see ``train``). Because
it is one function of its rows, it can be refitted without a fold of the images, and each image
scored by a layer that never saw it (*cross-fitting*). ``LayerRecipe.fit`` does that for every
fold, calibrates the new labels against the old ones on those held-out logits (see
``calibrate``), and fits the layer itself on every image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.calibrate import (
    Calibration,
    Choice,
    Pool,
    calibrate,
    fold_into_layer,
    layer_logits,
)
from engine.refit import Refit, Solve, refit_layer
from engine.train import (
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

    def image_share(self) -> torch.Tensor:
        """Each row's share of its image: one over the image's rows (its views) here."""
        if not len(self.group):
            return torch.ones(0)
        views = torch.bincount(self.group)
        return 1.0 / views[self.group].float()


@dataclass(frozen=True)
class Fitted:
    weight: torch.Tensor
    bias: torch.Tensor
    choice: Choice
    history: list[dict]


@dataclass(frozen=True)
class CrossFitted:
    layer: Fitted  # fitted on every row
    groups: torch.Tensor  # the images that could be held out ...
    predicted: torch.Tensor  # ... and their out-of-fold predictions
    logits: torch.Tensor  # ... from these out-of-fold (calibrated) logits
    fold_of: torch.Tensor  # every image's fold (NEVER: held out of none)
    fold_layers: list[tuple[torch.Tensor, torch.Tensor]]  # calibrated, one per fold


Anchor = tuple[torch.Tensor, torch.Tensor]  # the original layer a refit is anchored to


@dataclass(frozen=True)
class _Fold:
    fold: int
    weight: torch.Tensor  # uncalibrated, fitted without the fold
    bias: torch.Tensor
    held: torch.Tensor  # the rows it was fitted without
    groups: torch.Tensor  # the fold's images
    pool: Pool  # their logits


class LayerRecipe:
    """New rows imprinted with a median-margin bias; then, given old-label images, the whole
    layer refitted (``solver="refit"``) or the new rows trained by epochs (``"sgd"``, old rows
    fixed unless configured otherwise); then corrected by ``calibrate``. A new label with only
    ``FEW_SHOT`` images or fewer keeps the median-margin bias (and, with ``sgd``, its imprinted
    row): on one or two images nothing else says where its boundary lies. Which labels those
    are is decided once, on all images, so that every refit on a subset follows the same
    recipe."""

    def __init__(
        self,
        old_weight: torch.Tensor,
        old_bias: torch.Tensor,
        new_classes: list[int],
        *,
        init: str,
        training: HeadTraining,
        calibration: Calibration,
        should_stop: Callable[[], bool] = lambda: False,
        has_bias: bool = True,
        images: torch.Tensor | None = None,
        solver: str = "refit",
        refit: Refit = Refit(),
        device: torch.device | None = None,
    ) -> None:
        """``images``: images per class (all labels); None leaves every row trainable.
        ``solver``: ``refit`` the whole layer as one convex problem (see ``refit``) when there
        are old-label images, or ``sgd``: train the new rows (and slowly the old) by epochs.
        ``device``: where the refit is solved (a GPU when the job has one)."""
        self.solver, self.refit, self.device = solver, refit, device
        self.old_weight, self.old_bias, self.has_bias = old_weight, old_bias, has_bias
        self.num_old, self.new_classes = len(old_bias), new_classes
        self.init, self.training, self.calibration = init, training, calibration
        self.should_stop = should_stop
        self.solves: list[Solve] = []  # every refit's, in order: the folds', then the layer's
        few_shot = init == "imprint" and images is not None
        self.imprinted = [c for c in new_classes if int(images[c]) <= FEW_SHOT] if few_shot else []

    def fit(
        self,
        rows: Rows,
        folds: int,
        on_epoch: Callable[[dict], None] | None = None,
        on_fold: Callable[[int, int], None] | None = None,
        fold_of: torch.Tensor | None = None,
        anchors: list[Anchor] | None = None,
    ) -> CrossFitted:
        """The calibrated layer fitted on every row, and out-of-fold predictions of every image
        that can be held out. The ``folds`` refits (each without a fold of the images) give
        held-out logits of every image: the calibration is chosen on all of them for the
        layer, and, for each fold's predictions, on the other folds' only, so that no image is
        scored by a layer, or a correction, fitted on it.

        ``fold_of``: every image's fold (indexed by group; see ``lineage.assign_folds``), else
        dealt here. ``anchors``: the layer each fold's refit is anchored to (the base
        version's fold layers), else the original layer for every fold."""
        if fold_of is None:
            clean = rows.subset(rows.clean)
            fold_of = _folds(clean.y, clean.group, folds, self.training.seed)
        row_fold = fold_of[rows.group] if len(rows.group) else fold_of[:0]
        parts: list[_Fold] = []
        for fold in range(folds):
            held = row_fold == fold
            if held.any():
                anchor = anchors[fold] if anchors else None
                w, b, _ = self.fit_rows(rows.subset(~held), anchor=anchor)
                scored = rows.subset(held & rows.clean)
                pool = Pool(scored.logits(w, b), scored.y)
                parts.append(_Fold(fold, w, b, held, scored.group, pool))
            if on_fold:
                on_fold(fold + 1, folds)
        weight, bias, history = self.fit_rows(rows, on_epoch)
        pool = Pool.concat([p.pool for p in parts], weight.shape[0])
        choice = self._calibrate(weight, bias, rows, pool)
        weight, bias = fold_into_layer(weight, bias, self.num_old, choice.alpha, choice.beta)
        # a fold with no image: the whole layer never saw one of its (future) images
        fold_layers = [(weight, bias)] * folds
        groups, predicted, logits = [], [], []
        for k, part in enumerate(parts):
            others = Pool.concat([p.pool for i, p in enumerate(parts) if i != k], weight.shape[0])
            own = self._calibrate(part.weight, part.bias, rows.subset(~part.held), others)
            layer = fold_into_layer(part.weight, part.bias, self.num_old, own.alpha, own.beta)
            fold_layers[part.fold] = layer
            scored = layer_logits(part.pool.logits, self.num_old, own.alpha, own.beta)
            groups.append(part.groups)
            logits.append(scored)
            predicted.append(scored.argmax(dim=1))
        empty = torch.empty(0, dtype=torch.long)
        return CrossFitted(
            Fitted(weight, bias, choice, history),
            torch.cat(groups) if groups else empty,
            torch.cat(predicted) if predicted else empty,
            torch.cat(logits) if logits else torch.empty(0, weight.shape[0]),
            fold_of,
            fold_layers,
        )

    def _calibrate(
        self, weight: torch.Tensor, bias: torch.Tensor, rows: Rows, pool: Pool
    ) -> Choice:
        """``calibrate`` on a pool of held-out logits; a new label with no held-out image at
        all is represented by its images among ``rows`` (those ``weight``, ``bias`` were
        fitted on) scored in-sample."""
        evidence = [int((pool.targets == c).sum()) for c in self.new_classes]
        missing = [c for c, n in zip(self.new_classes, evidence, strict=True) if not n]
        if missing:
            seen = rows.subset(rows.clean & torch.isin(rows.y, torch.tensor(missing)))
            pool = Pool.concat([pool, Pool(seen.logits(weight, bias), seen.y)], weight.shape[0])
        limited = min(evidence) < self.calibration.min_new_evidence
        return calibrate(
            weight, self.num_old, pool, self.calibration, shift=self.has_bias, limited=limited
        )

    def fit_rows(
        self,
        rows: Rows,
        on_epoch: Callable[[dict], None] | None = None,
        anchor: Anchor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """The layer before calibration; its old rows start from (and are anchored to)
        ``anchor``, the original layer by default."""
        num_old, new = self.num_old, self.new_classes
        old_weight, old_bias = anchor if anchor is not None else (self.old_weight, self.old_bias)
        zeros = torch.zeros(len(new), old_weight.shape[1])
        weight = torch.cat([old_weight.float(), zeros])
        bias = torch.cat([old_bias.float(), torch.zeros(len(new))])
        x, y, index = rows.x, rows.y, rows.index
        if self.init == "imprint":
            weight[num_old:] = imprint_rows(x, y, new, weight[:num_old], index)
            if self.has_bias:
                bias[num_old:] = calibrate_new_bias(x, y, weight, bias, num_old, new, index)
        else:
            generator = torch.Generator().manual_seed(self.training.seed)
            std = weight[:num_old].std().item()
            weight[num_old:] = torch.randn(zeros.shape, generator=generator) * std
        if self.refits(y):
            return self._refit(rows, weight, bias)
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

    def refits(self, y: torch.Tensor) -> bool:
        """The whole layer is refitted when there are old-label images to anchor it."""
        return self.solver == "refit" and self.init == "imprint" and bool((y < self.num_old).any())

    def _refit(
        self, rows: Rows, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Every row refitted from the imprinted start; a label with only ``FEW_SHOT`` images
        or fewer then gets the median-margin bias, as an imprinted row does: on one or two
        images nothing else says where its boundary lies."""
        weight, bias = refit_layer(
            rows.x,
            rows.y,
            weight,
            bias,
            self.num_old,
            self.refit,
            rows.index,
            old_rows_frozen=self.training.old_rows_frozen,
            train_bias=self.has_bias,
            should_stop=self.should_stop,
            device=self.device,
            row_weight=rows.image_share(),
            on_solved=self.solves.append,
        )
        few = [c for c in self.imprinted if bool((rows.y == c).any())]
        if few and self.has_bias:
            bias[self.num_old :] = calibrate_new_bias(
                rows.x, rows.y, weight, bias, self.num_old, few, rows.index
            )
        return weight, bias, []

    def trains(self, y: torch.Tensor) -> bool:
        """Gradient steps need epochs, negatives (old-class images) and a label with more
        than a few shots."""
        if self.training.epochs <= 0 or not bool((y < self.num_old).any()):
            return False
        return len(self.imprinted) < len(self.new_classes)


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
