"""Teach a trained classifier new labels: the engine's one entry point.

    result = expand_classifier(request, progress=print_progress)
    save_safetensors(path, result.model, {...})

Every layer but the classifier is frozen (eval mode, so BatchNorm statistics stay put); the
backbone runs once per image and view, and the classifier layer is trained on those cached
features. Old rows are copied bit-exactly; they stay so unless the dataset holds old-label
images to adapt them on (then slowly, distilled towards the original: see ``train``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from worker.engine.architectures import Preprocessing
from worker.engine.calibrate import Calibration, Pool, calibrate, fold_into_layer
from worker.engine.data import (
    Augmentation,
    ImageDataset,
    Sample,
    augment_transform,
    eval_transform,
    stratified_split,
)
from worker.engine.errors import DataError
from worker.engine.evaluate import expansion_metrics
from worker.engine.features import FeatureCache, extract_features, pick_device
from worker.engine.finetune import Finetuning, finetune, predict
from worker.engine.heads import Head, expand_head
from worker.engine.train import (
    HeadTraining,
    calibrate_new_bias,
    imprint_rows,
    linear_logits,
    train_head,
)
from worker.engine.weights import load_classifier


@dataclass(frozen=True)
class Progress:
    stage: str  # loading | extracting | training | evaluating
    fraction: float
    epoch: int | None = None
    epochs: int | None = None
    message: str = ""


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class ExpansionConfig:
    init: str = "imprint"  # imprint | random
    training: HeadTraining = field(default_factory=HeadTraining)
    validation_split: float = 0.2
    augmentation: Augmentation = field(default_factory=Augmentation)
    batch_size: int = 64  # for feature extraction
    num_workers: int = 0
    device: str = "auto"
    freeze: str = "head"  # head | last_block | none
    calibration: Calibration = field(default_factory=Calibration)
    feature_memory_bytes: int = 2 << 30  # cached features beyond this spill to disk
    spill_dir: Path | None = None  # where they spill (default: the system's temp folder)


@dataclass
class ExpansionRequest:
    architecture: str
    labels: list[str]
    weights: Path  # a safetensors file
    preprocessing: Preprocessing
    samples: list[Sample]
    new_labels: list[str]
    config: ExpansionConfig = field(default_factory=ExpansionConfig)


@dataclass
class ExpansionResult:
    model: nn.Module
    labels: list[str]
    metrics: dict


def _noop(_: Progress) -> None:
    pass


def expand_classifier(
    request: ExpansionRequest,
    progress: ProgressFn = _noop,
    should_stop: Callable[[], bool] = lambda: False,
) -> ExpansionResult:
    """Return the model with ``len(labels) + len(new_labels)`` outputs and its metrics."""
    cfg = request.config
    with FeatureCache(cfg.feature_memory_bytes, cfg.spill_dir) as cache:
        return _expand(request, cache, progress, should_stop)


def _expand(
    request: ExpansionRequest,
    cache: FeatureCache,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
) -> ExpansionResult:
    started = time.perf_counter()
    cfg = request.config
    device = pick_device(cfg.device)
    progress(Progress("loading", 0.0, message=f"building {request.architecture}"))
    model, head = load_classifier(request.architecture, len(request.labels), request.weights)
    model.requires_grad_(False)
    teacher = copy.deepcopy(model) if cfg.freeze != "head" else None
    labels = list(request.labels) + list(request.new_labels)
    samples, targets = _targets(request.samples, labels)
    num_old = len(request.labels)
    new_classes = list(range(num_old, len(labels)))

    train_idx, val_idx = stratified_split(targets.tolist(), cfg.validation_split, cfg.training.seed)
    train_x, train_y, groups, val_x, val_y = _extract(
        model,
        head,
        samples,
        targets,
        train_idx,
        val_idx,
        request.preprocessing,
        cfg,
        device,
        cache,
        progress,
        should_stop,
    )
    extract_s = time.perf_counter() - started

    progress(Progress("training", 0.0, 0, cfg.training.epochs))
    old_weight = head.module.weight.detach().float().cpu()
    old_bias = _bias(head)

    def on_epoch(record: dict) -> None:
        e = record["epoch"]
        progress(
            Progress(
                "training",
                e / cfg.training.epochs,
                e,
                cfg.training.epochs,
                f"loss {record['train_loss']:.4f}",
            )
        )

    has_bias = head.module.bias is not None
    images = torch.bincount(targets[train_idx], minlength=len(labels))
    rows = RowFitter(old_weight, old_bias, new_classes, cfg, should_stop, has_bias, images)
    weight, bias, history = rows.fit(train_x, train_y, on_epoch=on_epoch, validation=(val_x, val_y))
    progress(Progress("training", 1.0, message="calibrating the new classes"))
    pool = _calibration_pool(rows, weight, bias, train_x, train_y, groups, val_x, val_y)
    choice = calibrate(weight, num_old, pool, cfg.calibration, shift=has_bias)
    weight, bias = fold_into_layer(weight, bias, num_old, choice.alpha, choice.beta)
    train_s = time.perf_counter() - started - extract_s

    progress(Progress("evaluating", 0.0))
    before = linear_logits(val_x, old_weight, old_bias).argmax(dim=1)
    after = linear_logits(val_x, weight, bias).argmax(dim=1)
    metrics = expansion_metrics(val_y, before, after, labels, num_old)

    grown = expand_head(model, head, len(new_classes))
    with torch.no_grad():
        grown.module.weight.copy_(weight.to(grown.module.weight.dtype))
        if grown.module.bias is not None:
            grown.module.bias.copy_(bias.to(grown.module.bias.dtype))
    if teacher is not None:  # the head is warm; now the unfrozen backbone learns too
        history, metrics = _finetune(
            request,
            model,
            grown,
            teacher,
            samples,
            targets,
            train_idx,
            val_idx,
            device,
            progress,
            should_stop,
            history,
        )
        train_s = time.perf_counter() - started - extract_s
    total_s = time.perf_counter() - started
    images = len(train_idx) * cfg.augmentation.views + len(val_idx)
    metrics |= {
        "history": history,
        "timing": {
            "extract_s": round(extract_s, 3),
            "train_s": round(train_s, 3),
            "total_s": round(total_s, 3),
            "images_per_s": round(images / extract_s, 1) if extract_s else None,
        },
        "feature_cache": {"memory_bytes": cache.in_memory, "disk_bytes": cache.spilled_bytes},
        "device": str(device),
        # with a backbone fine-tuned afterwards, the correction was chosen on the warm head
        "calibration": choice.as_metrics() | {"before_finetune": teacher is not None},
        "method": ("imprint+train" if history else cfg.init)
        + (f"+finetune:{cfg.freeze}" if teacher is not None else ""),
        "split": {"train": len(train_idx), "validation": len(val_idx)},
    }
    progress(Progress("evaluating", 1.0))
    return ExpansionResult(model.cpu().eval(), labels, metrics)


def _finetune(
    request: ExpansionRequest,
    model: nn.Module,
    head: Head,
    teacher: nn.Module,
    samples: list[Sample],
    targets: torch.Tensor,
    train_idx: list[int],
    val_idx: list[int],
    device: torch.device,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
    history: list[dict],
) -> tuple[list[dict], dict]:
    cfg, prep = request.config, request.preprocessing
    num_old = len(request.labels)
    clean = eval_transform(prep)
    transform = clean if cfg.augmentation.is_identity else augment_transform(prep, cfg.augmentation)
    epochs = cfg.training.epochs

    def on_epoch(record: dict) -> None:
        e = record["epoch"]
        progress(
            Progress(
                "training",
                e / max(epochs, 1),
                e,
                epochs,
                f"{cfg.freeze}: loss {record['train_loss']:.4f}",
            )
        )

    tuned = finetune(
        model,
        head,
        teacher,
        [samples[i] for i in train_idx],
        targets[train_idx],
        num_old,
        Finetuning(
            policy=cfg.freeze,
            epochs=epochs,
            learning_rate=cfg.training.learning_rate,
            batch_size=cfg.training.batch_size,
            weight_decay=cfg.training.weight_decay,
            old_rows_frozen=cfg.training.old_rows_frozen,
            old_rows_lr_scale=cfg.training.old_rows_lr_scale,
            seed=cfg.training.seed,
        ),
        prep,
        transform,
        device,
        on_epoch,
        should_stop,
    )
    progress(Progress("evaluating", 0.0))
    val_samples = [samples[i] for i in val_idx]
    before = predict(teacher, val_samples, prep, clean, device)
    after = predict(model, val_samples, prep, clean, device)
    labels = list(request.labels) + list(request.new_labels)
    return history + tuned, expansion_metrics(targets[val_idx], before, after, labels, num_old)


FEW_SHOT = 2  # a new label with at most this many training images is imprinted, not trained


class RowFitter:
    """The recipe for the classifier layer, reusable on any subset of the cached features:
    imprinted new rows with a calibrated bias, then trained (old rows fixed unless configured
    otherwise). A new label with only ``FEW_SHOT`` training images or fewer keeps its imprinted
    row: on one or two images gradient steps only memorise them. Which labels those are is
    decided once, on the whole training set, so that cross-fitting refits the same recipe."""

    def __init__(
        self,
        old_weight: torch.Tensor,
        old_bias: torch.Tensor,
        new_classes: list[int],
        cfg: ExpansionConfig,
        should_stop: Callable[[], bool],
        has_bias: bool = True,
        images: torch.Tensor | None = None,
    ) -> None:
        """``images``: training images per class (all labels); None leaves every row trainable."""
        self.old_weight, self.old_bias, self.has_bias = old_weight, old_bias, has_bias
        self.num_old, self.new_classes = len(old_bias), new_classes
        self.cfg, self.should_stop = cfg, should_stop
        few_shot = cfg.init == "imprint" and images is not None
        self.imprinted = [c for c in new_classes if int(images[c]) <= FEW_SHOT] if few_shot else []

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Rows fitted on ``x[index]`` (every row when None), labelled ``y``."""
        num_old, new = self.num_old, self.new_classes
        zeros = torch.zeros(len(new), self.old_weight.shape[1])
        weight = torch.cat([self.old_weight, zeros])
        bias = torch.cat([self.old_bias, torch.zeros(len(new))])
        if self.cfg.init == "imprint":
            weight[num_old:] = imprint_rows(x, y, new, weight[:num_old], index)
            if self.has_bias:
                bias[num_old:] = calibrate_new_bias(x, y, weight, bias, num_old, new, index)
        else:
            generator = torch.Generator().manual_seed(self.cfg.training.seed)
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
            self.cfg.training,
            validation=validation,
            on_epoch=on_epoch,
            should_stop=self.should_stop,
            index=index,
            train_bias=self.has_bias,
            fixed=self.imprinted,
        )

    def trains(self, y: torch.Tensor) -> bool:
        """Gradient steps need epochs, negatives (old-class images) and a label with more
        than a few shots."""
        if self.cfg.training.epochs <= 0 or not bool((y < self.num_old).any()):
            return False
        return len(self.imprinted) < len(self.new_classes)


def _calibration_pool(
    rows: RowFitter,
    weight: torch.Tensor,
    bias: torch.Tensor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    groups: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> Pool:
    """Held-out logits to calibrate on: the validation split and, when it holds fewer than
    ``min_validation_images`` of some new label, training images scored by rows refitted
    without them (cross-fitting, views of an image held out together). A new label with no
    held-out image at all is represented by its training images, scored in-sample."""
    cal = rows.cfg.calibration
    num_classes = weight.shape[0]
    pools = [Pool(linear_logits(val_x, weight, bias), val_y)] if len(val_y) else []
    val_counts = torch.bincount(val_y, minlength=num_classes)[rows.num_old :]
    first = _first_views(groups)
    if cal.fits_on_pool and cal.folds > 1 and val_counts.min() < cal.min_validation_images:
        fold_of = _folds(train_y[first], groups[first], cal.folds, rows.cfg.training.seed)[groups]
        for fold in range(cal.folds):
            held = fold_of == fold
            if not held.any():
                continue
            kept = (~held).nonzero().flatten()
            w, b, _ = rows.fit(train_x, train_y[kept], kept)
            clean = (held & first).nonzero().flatten()
            pools.append(Pool(linear_logits(train_x, w, b, clean), train_y[clean]))
    pool = Pool.concat(pools, num_classes)
    missing = [c for c in rows.new_classes if not bool((pool.targets == c).any())]
    if missing:
        seen = (first & torch.isin(train_y, torch.tensor(missing))).nonzero().flatten()
        in_sample = Pool(linear_logits(train_x, weight, bias, seen), train_y[seen])
        pool = Pool.concat([pool, in_sample], num_classes)
    return pool


def _first_views(groups: torch.Tensor) -> torch.Tensor:
    """True for the first row of every image (its clean, unaugmented view)."""
    if not len(groups):
        return torch.zeros(0, dtype=torch.bool)
    rows = torch.arange(len(groups))
    first = torch.full((int(groups.max()) + 1,), len(groups))
    first = first.scatter_reduce(0, groups, rows, reduce="amin")
    return first[groups] == rows


def _folds(targets: torch.Tensor, groups: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Fold of every image (indexed by group), -1 for never held out: dealt round-robin within
    each class so that every fold holds every class; a class keeps a training image in every
    fold (its row needs one)."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.full((int(groups.max()) + 1,), -1)
    for c in targets.unique().tolist():
        members = groups[targets == c]
        members = members[torch.randperm(len(members), generator=generator)]
        for i, g in enumerate(members.tolist()):
            if len(members) > folds:
                fold_of[g] = i % folds
            elif i < len(members) - 1:
                fold_of[g] = i
    return fold_of


def _bias(head: Head) -> torch.Tensor:
    if head.module.bias is None:
        return torch.zeros(head.num_classes)
    return head.module.bias.detach().float().cpu()


def _targets(samples: list[Sample], labels: list[str]) -> tuple[list[Sample], torch.Tensor]:
    index = {label: i for i, label in enumerate(labels)}
    kept = [s for s in samples if s.label in index]
    if not kept:
        raise DataError("none of the images belongs to a known or new label")
    return kept, torch.tensor([index[s.label] for s in kept])


def _extract(
    model: nn.Module,
    head: Head,
    samples: list[Sample],
    targets: torch.Tensor,
    train_idx: list[int],
    val_idx: list[int],
    prep: Preprocessing,
    cfg: ExpansionConfig,
    device: torch.device,
    cache: FeatureCache,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, targets and image indices of the training views (the clean view of every
    image first, then its augmented ones); features and targets of the validation images; in
    one progress bar."""
    views = max(1, cfg.augmentation.views)
    clean = eval_transform(prep)
    augmented = clean if cfg.augmentation.is_identity else augment_transform(prep, cfg.augmentation)
    train_samples = [samples[i] for i in train_idx]
    val_samples = [samples[i] for i in val_idx]
    train_views = ImageDataset(
        train_samples, prep, augmented, views, first_view=clean, seed=cfg.training.seed
    )
    dataset = ConcatDataset([train_views, ImageDataset(val_samples, prep, clean)])
    total = len(dataset)

    def on_batch(done: int, _total: int) -> None:
        progress(Progress("extracting", done / total, message=f"{done}/{total} images"))

    loader = DataLoader(  # one loader (one set of workers) for training views and validation
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    feats, local = extract_features(
        model, head, loader, device, on_batch, should_stop, cache.allocate
    )
    n = len(train_views)
    train_x, groups, val_x, val_local = feats[:n], local[:n], feats[n:], local[n:]
    return train_x, targets[train_idx][groups], groups, val_x, targets[val_idx][val_local]
