"""Initialise and train the classifier layer on cached features.

With ``old_rows_frozen`` only the new rows move, so every old row stays bit-identical and the
old classes can only lose images to the new ones, never to each other. Trainable old rows
learn at a hundredth of the new rows' rate, their logits distilled towards the original layer's
(LwF) so that they adapt to the new labels without forgetting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.errors import JobCancelled

EpochDone = Callable[[dict], None]


@dataclass(frozen=True)
class HeadTraining:
    epochs: int = 30
    learning_rate: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    old_rows_frozen: bool = True
    # trainable old rows: a slower rate, and their logits distilled towards the original (LwF)
    old_rows_lr_scale: float = 0.01
    distillation_weight: float = 1.0
    temperature: float = 2.0


CHUNK = 65536  # rows per matrix product over cached features (they may be memory-mapped)


def linear_logits(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``features[index] @ weight.T + bias``, a chunk at a time."""
    rows = torch.arange(len(features)) if index is None else index
    if not len(rows):
        return torch.empty(0, weight.shape[0])
    return torch.cat(
        [features[rows[i : i + CHUNK]] @ weight.T + bias for i in range(0, len(rows), CHUNK)]
    )


def imprint_rows(
    features: torch.Tensor,
    targets: torch.Tensor,
    classes: list[int],
    old_weight: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row per class: the normalised mean of its normalised features, scaled to the mean
    norm of the old rows so that new logits live on the old logits' scale. ``targets`` label
    ``features[index]`` (every row when ``index`` is None)."""
    rows_of = torch.arange(len(features)) if index is None else index
    scale = old_weight.norm(dim=1).mean()
    rows = []
    for c in classes:
        mean = F.normalize(features[rows_of[targets == c]], dim=1).mean(dim=0)
        rows.append(F.normalize(mean, dim=0) * scale)
    return torch.stack(rows)


def calibrate_new_bias(
    features: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_old: int,
    classes: list[int],
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The new rows' biases, those of ``classes`` moved so as to put each one's boundary
    against the best old class halfway between its own images and the old-class images
    (medians of the logit margin).

    Without old-class images there is nothing to separate from: the mean old bias is used.
    """
    calibrated = bias[num_old:].clone()
    old_mask = targets < num_old
    base = bias[:num_old].mean() if num_old else torch.tensor(0.0)
    with torch.no_grad():
        logits = linear_logits(features, weight, bias, index)
        best_old = logits[:, :num_old].max(dim=1).values
        for c in classes:
            if not old_mask.any():
                calibrated[c - num_old] = base
                continue
            margin = logits[:, c] - best_old
            shift = (margin[targets == c].median() + margin[old_mask].median()) / 2
            calibrated[c - num_old] -= shift
    return calibrated


def balanced_class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, so ten new images weigh as much as a thousand old ones."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def train_head(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    num_old: int,
    cfg: HeadTraining,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: EpochDone | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    index: torch.Tensor | None = None,
    train_bias: bool = True,
    fixed: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Train the classifier layer ``(weight, bias)`` with a class-balanced cross-entropy on
    ``features[index]`` (every row when ``index`` is None), labelled ``targets``. A layer
    without a bias (``train_bias=False``) keeps ``bias`` as given; the new rows listed in
    ``fixed`` (class indices) keep their values while their images still train the others.

    Returns new tensors and the per-epoch history ``[{epoch, train_loss, val_accuracy}]``.
    """
    frozen = cfg.old_rows_frozen
    teacher_w, teacher_b = weight[:num_old].detach().clone(), bias[:num_old].detach().clone()
    w_old = teacher_w.clone().requires_grad_(not frozen)
    b_old = teacher_b.clone().requires_grad_(not frozen and train_bias)
    w = weight[num_old:].detach().clone().requires_grad_(True)
    b = bias[num_old:].detach().clone().requires_grad_(train_bias)
    kept = torch.tensor([c - num_old for c in fixed], dtype=torch.long)
    if len(kept):  # no gradient reaches them (weight decay may; they are restored at the end)
        moving = torch.ones(len(w), 1)
        moving[kept] = 0
        w.register_hook(lambda g: g * moving)
        if train_bias:
            b.register_hook(lambda g: g * moving[:, 0])
    groups = [{"params": [w, b] if train_bias else [w], "lr": cfg.learning_rate}]
    if not frozen:
        old_params = [w_old, b_old] if train_bias else [w_old]
        groups.append({"params": old_params, "lr": cfg.learning_rate * cfg.old_rows_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    class_weights = balanced_class_weights(targets, weight.shape[0])
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    distil = not frozen and cfg.distillation_weight > 0 and num_old > 0
    t = cfg.temperature

    def logits(x: torch.Tensor) -> torch.Tensor:
        return x @ torch.cat([w_old, w]).T + torch.cat([b_old, b])

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = logits(x)
        loss = F.cross_entropy(out, y, weight=class_weights)
        if distil:
            with torch.no_grad():
                teacher = F.softmax((x @ teacher_w.T + teacher_b) / t, dim=1)
            student = F.log_softmax(out[:, :num_old] / t, dim=1)
            kl = F.kl_div(student, teacher, reduction="batchmean")
            loss = loss + cfg.distillation_weight * t * t * kl
        return loss

    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(targets), generator=generator)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            if should_stop():
                raise JobCancelled()
            idx = order[start : start + cfg.batch_size]
            x = features[idx if index is None else index[idx]]
            loss = loss_of(x, targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        record = {"epoch": epoch, "train_loss": total / len(targets), "val_accuracy": None}
        if validation is not None and len(validation[1]):
            with torch.no_grad():
                predicted = logits(validation[0]).argmax(dim=1)
            record["val_accuracy"] = (predicted == validation[1]).float().mean().item()
        history.append(record)
        if on_epoch:
            on_epoch(record)
    with torch.no_grad():
        w[kept], b[kept] = weight[num_old:][kept], bias[num_old:][kept]
        return torch.cat([w_old, w]).detach(), torch.cat([b_old, b]).detach(), history
