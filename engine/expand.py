"""Teach a trained classifier new labels: the engine's one entry point.

    result = expand_classifier(request, progress=print_progress)
    save_safetensors(path, result.model, {...})

Every layer but the classifier is frozen (eval mode, so BatchNorm statistics stay put); the
backbone runs once per image and view, and the classifier layer is trained on those cached
features. Old-label images come from the job and from the base version's reference set; they
teach the new rows what they are not, let the old rows adapt, and measure what the old labels
kept. Every image is measured by a layer that never saw it: the layer is refitted ``folds``
times without a fold of the images (cross-fitting), and the version itself is fitted on all.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.calibrate import Calibration
from engine.crossfit import cross_fit
from engine.data import Augmentation, Sample, eval_transform, stratified_split
from engine.device import (
    DEFAULT_PRECISION,
    compute_dtype,
    halving_on_oom,
    pick_device,
    precision_name,
    release_memory,
)
from engine.errors import EngineError
from engine.evaluate import expansion_metrics
from engine.families import family_of
from engine.features import FeatureCache
from engine.finetune import Finetuning, finetune, predict
from engine.gather import (
    JOB,
    REFERENCE,
    Gathered,
    extract_rows,
    gather_images,
    train_transform,
)
from engine.heads import Head, expand_head
from engine.lineage import NEVER, Lineage, near_duplicate_groups
from engine.preprocessing import Preprocessing
from engine.recipe import LayerRecipe, Rows
from engine.reference import (
    Kept,
    ReferenceSet,
    backbone_fingerprint,
    select_reference,
)
from engine.refit import Refit
from engine.train import HeadTraining
from engine.weights import load_classifier

T = TypeVar("T")


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
    validation_split: float = 0.2  # held out for measurement when the backbone is fine-tuned
    augmentation: Augmentation = field(default_factory=Augmentation)
    batch_size: int = 64  # images per pass of the backbone (extraction, evaluation)
    num_workers: int = 0  # loader processes (on a GPU fine-tuning and evaluation use them too)
    device: str = "auto"
    precision: str = DEFAULT_PRECISION  # auto | bf16 | fp16 | fp32, on a GPU (see device.py)
    freeze: str = "head"  # head | last_block | none
    calibration: Calibration = field(default_factory=Calibration)
    feature_memory_bytes: int = 2 << 30  # cached features beyond this spill to disk
    spill_dir: Path | None = None  # where they spill (default: the system's temp folder)
    folds: int = 5  # cross-fitting rounds that measure the layer (freeze=head)
    reference_per_label: int = 100  # the new version's reference set, per label
    reference_selection: str = "random"  # random | herding
    solver: str = "refit"  # refit (the whole layer, convex) | sgd (new rows by epochs)
    refit: Refit = field(default_factory=Refit)  # the refit's ridges (bench/quality.py)
    # images of one label whose feature offsets have at least this cosine are near-duplicates,
    # kept in one fold (1 or more: none); only labels of at most ``near_duplicate_max`` images
    near_duplicate: float = 0.95
    near_duplicate_max: int = 10_000


@dataclass
class ExpansionRequest:
    architecture: str
    labels: list[str]
    weights: Path  # a safetensors file
    preprocessing: Preprocessing
    samples: list[Sample]
    new_labels: list[str]
    config: ExpansionConfig = field(default_factory=ExpansionConfig)
    reference: ReferenceSet | None = None  # the base version's reference images
    lineage: Lineage | None = None  # what the base version's layer was fitted on


@dataclass
class ExpansionResult:
    model: nn.Module
    labels: list[str]
    metrics: dict
    reference: list[Kept] = field(default_factory=list)  # the new version's reference set
    # clean-view features of the job's and the reference's images by digest, computed by the
    # base backbone (``fingerprint``); valid for the new version too unless backbone_changed
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = ""
    backbone_changed: bool = False
    lineage: Lineage = field(default_factory=Lineage)  # what the new version was fitted on


# what to lower when a step runs out of GPU memory (the worker's setting, the job's field)
EXTRACT_BATCH_SETTING = "GRAFT_EXTRACT_BATCH_SIZE"
FINETUNE_BATCH_SETTING = "the job's batch_size"


@dataclass
class _Compute:
    """Where the backbone runs, in what dtype, and at what batch size (halved for the rest
    of the job once a pass runs out of GPU memory)."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    batch_sizes: dict[str, int] = field(default_factory=dict)  # step -> batch size it ran at

    def run(
        self,
        step: str,
        doing: str,
        fn: Callable[[int], T],
        progress: ProgressFn,
        stage: str,
        batch_size: int | None = None,
        lower: str = EXTRACT_BATCH_SETTING,
        on_retry: Callable[[int], None] | None = None,
    ) -> T:
        """``fn(batch size)``, once more at half of it when it runs out of GPU memory."""
        size = self.batch_size if batch_size is None else batch_size

        def retry(half: int) -> None:
            message = f"out of GPU memory {doing} at batch size {size}; trying {half}"
            progress(Progress(stage, 0.0, message=message))
            if on_retry is not None:
                on_retry(half)

        out, used = halving_on_oom(fn, size, doing, lower, self.device, retry)
        self.batch_sizes[step] = used
        if batch_size is None:
            self.batch_size = used
        return out


def _noop(_: Progress) -> None:
    pass


def expand_classifier(
    request: ExpansionRequest,
    progress: ProgressFn = _noop,
    should_stop: Callable[[], bool] = lambda: False,
) -> ExpansionResult:
    """Return the model with ``len(labels) + len(new_labels)`` outputs and its metrics.

    The model comes back on the CPU; on a GPU, what the job held there is released when it
    ends, however it ends."""
    cfg = request.config
    device = pick_device(cfg.device)
    try:
        with FeatureCache(cfg.feature_memory_bytes, cfg.spill_dir) as cache:
            return _expand(request, cache, progress, should_stop, device)
    except BaseException as exc:
        if device.type == "cuda":  # the failed frames hold GPU tensors: drop them now
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        release_memory(device)


def _expand(
    request: ExpansionRequest,
    cache: FeatureCache,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
    device: torch.device,
) -> ExpansionResult:
    started = time.perf_counter()
    cfg = request.config
    compute = _Compute(device, compute_dtype(device, cfg.precision), cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(Progress("loading", 0.0, message=f"building {request.architecture}"))
    model, head = load_classifier(request.architecture, len(request.labels), request.weights)
    model.requires_grad_(False)
    fingerprint = backbone_fingerprint(model, head, request.preprocessing, compute.dtype)
    labels = list(request.labels) + list(request.new_labels)
    tuned = cfg.freeze != "head"
    family = family_of(model)
    if tuned and family in ("keras", "onnx"):
        raise EngineError(
            f"freeze={cfg.freeze!r}: {family} models are grown with freeze='head' (their own "
            "layers are not fine-tuned)"
        )
    reference = request.reference
    images = gather_images(
        request.samples,
        labels,
        len(request.labels),
        reference.images if reference else [],
        reference.fetch if reference else lambda _: [],
        reference.cached_features(fingerprint) if reference and not tuned else {},
        head.in_features,
    )
    seed = cfg.training.seed
    if tuned:
        train, val = stratified_split(images.targets.tolist(), cfg.validation_split, seed)
        # what the base was fitted on cannot measure it: it trains
        seen = request.lineage.fold_of if request.lineage else {}
        train += [g for g in val if images.digests[g] in seen]
        val = [g for g in val if images.digests[g] not in seen]
    else:
        train, val = list(range(len(images.targets))), []

    def on_batch(done: int, total: int) -> None:
        progress(Progress("extracting", done / total, message=f"{done}/{total} images"))

    mark = cache.mark()

    def extract(batch_size: int) -> Rows:
        cache.release_since(mark)  # what a failed attempt allocated
        return extract_rows(
            model,
            head,
            images,
            train=train,
            prep=request.preprocessing,
            views=cfg.augmentation.views,
            aug=cfg.augmentation,
            batch_size=batch_size,
            num_workers=cfg.num_workers,
            seed=seed,
            device=device,
            cache=cache,
            on_batch=on_batch,
            should_stop=should_stop,
            dtype=compute.dtype,
        )

    rows = compute.run("extract", "extracting features", extract, progress, "extracting")
    extract_s = time.perf_counter() - started

    stage = _fit_and_measure if not tuned else _fit_and_finetune
    grown, metrics, history, lineage = stage(
        request, model, head, images, rows, train, val, compute, progress, should_stop
    )
    train_s = time.perf_counter() - started - extract_s
    progress(Progress("evaluating", 1.0, message="choosing the reference set"))
    kept = _new_reference(images, rows, cfg)
    total_s = time.perf_counter() - started
    views = images.extracted
    if device.type == "cuda":
        metrics["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    metrics |= {
        "history": history,
        "timing": {
            "extract_s": round(extract_s, 3),
            "train_s": round(train_s, 3),
            "total_s": round(total_s, 3),
            "images_per_s": round(views / extract_s, 1) if extract_s else None,
        },
        "feature_cache": {
            "memory_bytes": cache.in_memory,
            "disk_bytes": cache.spilled_bytes,
            "reference_cached": images.cached_count,
        },
        "device": str(device),
        "precision": precision_name(compute.dtype),  # the backbone's; the layer's is fp32
        "batch_size": dict(compute.batch_sizes),
        "reference": {
            "used": images.reference_count(),
            "kept": _count_labels(kept),
        },
        "hygiene": {"conflicts": images.conflicts},
    }
    # features worth caching: the base's reference images and the new version's
    wanted = {k.digest for k in kept} | {
        d for d, source in zip(images.digests, images.sources, strict=True) if source == REFERENCE
    }
    features = {
        images.digests[g]: rows.x[r].clone()
        for g, r in images.clean_row.items()
        if images.digests[g] in wanted
    }
    return ExpansionResult(
        grown,
        labels,
        metrics,
        reference=kept,
        features=features,
        fingerprint=fingerprint,
        backbone_changed=tuned,
        lineage=lineage,
    )


def _recipe(
    request: ExpansionRequest,
    head: Head,
    rows: Rows,
    num_classes: int,
    should_stop: Callable[[], bool],
    device: torch.device,
) -> LayerRecipe:
    cfg = request.config
    num_old = len(request.labels)
    return LayerRecipe(
        head.module.weight.detach().float().cpu(),
        _bias(head),
        list(range(num_old, num_classes)),
        init=cfg.init,
        training=cfg.training,
        calibration=cfg.calibration,
        should_stop=should_stop,
        has_bias=head.module.bias is not None,
        images=torch.bincount(rows.y[rows.clean], minlength=num_classes),
        solver=cfg.solver,
        refit=cfg.refit,
        device=device,
    )


def _epoch_progress(cfg: ExpansionConfig, progress: ProgressFn, prefix: str = "") -> Callable:
    epochs = cfg.training.epochs

    def on_epoch(record: dict) -> None:
        e = record["epoch"]
        loss = f"{prefix}loss {record['train_loss']:.4f}"
        progress(Progress("training", e / max(epochs, 1), e, epochs, loss))

    return on_epoch


def _fit_and_measure(
    request: ExpansionRequest,
    model: nn.Module,
    head: Head,
    images: Gathered,
    rows: Rows,
    train: list[int],
    val: list[int],
    compute: _Compute,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
) -> tuple[nn.Module, dict, list[dict], Lineage]:
    """Frozen backbone: fit the layer on every image; measure it by cross-fitting, in the
    folds of the base version's lineage (see ``lineage``)."""
    cfg = request.config
    labels = list(request.labels) + list(request.new_labels)
    num_old = len(request.labels)
    base = request.lineage or Lineage()
    recipe = _recipe(request, head, rows, len(labels), should_stop, compute.device)
    clean_rows = torch.tensor([images.clean_row[g] for g in range(len(images.targets))])
    together = near_duplicate_groups(
        rows.x, clean_rows, images.targets, cfg.near_duplicate, cfg.near_duplicate_max
    )
    folds = base.folds if base.has_layers else cfg.folds

    def on_fold(done: int, total: int) -> None:
        message = f"cross-fitting {done}/{total}"
        progress(Progress("training", done / (total + 1), message=message))

    progress(Progress("training", 0.0, message=f"cross-fitting 0/{folds}"))
    measured = cross_fit(
        recipe,
        rows,
        clean_rows,
        images.targets,
        images.digests,
        labels,
        base,
        folds,
        cfg.training.seed,
        together,
        _epoch_progress(cfg, progress),
        on_fold,
        lambda g: _describe(images, g),
    )
    progress(Progress("evaluating", 0.0))
    metrics = measured.metrics
    metrics["measurement"] = images.measurement(
        "cross_fitted", measured.groups, labels, num_old, folds=folds
    ) | metrics.pop("lineage")
    metrics["method"] = _method(recipe, rows, measured.layer.history)
    grown = expand_head(model, head, len(labels) - num_old)
    _load_layer(grown, measured.layer.weight, measured.layer.bias)
    return model.cpu().eval(), metrics, measured.layer.history, measured.lineage


def _describe(images: Gathered, group: int) -> dict:
    sample = images.samples[group]
    path = sample.path if sample is not None else None
    shown = (
        f"{path.parent.name}/{path.name}"
        if path is not None and images.sources[group] == JOB
        else None
    )
    return {"digest": images.digests[group], "source": images.sources[group], "file": shown}


def _fit_and_finetune(
    request: ExpansionRequest,
    model: nn.Module,
    head: Head,
    images: Gathered,
    rows: Rows,
    train: list[int],
    val: list[int],
    compute: _Compute,
    progress: ProgressFn,
    should_stop: Callable[[], bool],
) -> tuple[nn.Module, dict, list[dict], Lineage]:
    """Unfrozen backbone: warm the layer on the training split's features, fine-tune the
    backbone with it, measure on the held-out split."""
    cfg, prep = request.config, request.preprocessing
    labels = list(request.labels) + list(request.new_labels)
    num_old = len(request.labels)
    teacher = copy.deepcopy(model)
    in_train = torch.zeros(len(images.targets), dtype=torch.bool)
    in_train[train] = True
    train_rows = rows.subset(in_train[rows.group])
    recipe = _recipe(request, head, train_rows, len(labels), should_stop, compute.device)
    progress(Progress("training", 0.0, 0, cfg.training.epochs))
    on_epoch = _epoch_progress(cfg, progress)
    fitted = recipe.fit(train_rows, cfg.calibration.folds, on_epoch).layer
    grown = expand_head(model, head, len(labels) - num_old)
    _load_layer(grown, fitted.weight, fitted.bias)
    settings = Finetuning(
        policy=cfg.freeze,
        epochs=cfg.training.epochs,
        learning_rate=cfg.training.learning_rate,
        batch_size=cfg.training.batch_size,
        weight_decay=cfg.training.weight_decay,
        old_rows_frozen=cfg.training.old_rows_frozen,
        old_rows_lr_scale=cfg.training.old_rows_lr_scale,
        seed=cfg.training.seed,
        num_workers=cfg.num_workers,
    )
    device = compute.device
    # the warm model, to start again from if fine-tuning runs out of GPU memory
    warm = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def tune(batch_size: int) -> list[dict]:
        return finetune(
            model,
            grown,
            teacher,
            [images.samples[i] for i in train],
            images.targets[train],
            num_old,
            replace(settings, batch_size=batch_size),
            prep,
            train_transform(prep, cfg.augmentation),
            device,
            _epoch_progress(cfg, progress, f"{cfg.freeze}: "),
            should_stop,
            compute.dtype,
        )

    history = fitted.history + compute.run(
        "finetune",
        "fine-tuning",
        tune,
        progress,
        "training",
        batch_size=settings.batch_size,
        lower=FINETUNE_BATCH_SETTING,
        on_retry=lambda _: model.load_state_dict(warm),
    )
    del warm
    progress(Progress("evaluating", 0.0, message=f"{len(val)} held-out images"))
    val_samples = [images.samples[i] for i in val]
    clean = eval_transform(prep)

    def predictions(of: nn.Module) -> Callable[[int], torch.Tensor]:
        def run(batch_size: int) -> torch.Tensor:
            return predict(
                of, val_samples, prep, clean, device, batch_size, compute.dtype, cfg.num_workers
            )

        return run

    doing = "measuring on the held-out images"
    before = compute.run("evaluate", doing, predictions(teacher), progress, "evaluating")
    after = compute.run("evaluate", doing, predictions(model), progress, "evaluating")
    groups = torch.tensor(val, dtype=torch.long)
    targets = images.targets[groups]
    metrics = expansion_metrics(targets, before, after, labels, num_old, cfg.training.seed)
    metrics["measurement"] = images.measurement("holdout", groups, labels, num_old)
    # the correction was chosen on the warm head, before the backbone was fine-tuned
    metrics["calibration"] = fitted.choice.as_metrics() | {"before_finetune": True}
    warm = _method(recipe, train_rows, fitted.history)
    metrics["method"] = f"{warm}+finetune:{cfg.freeze}"
    base = request.lineage or Lineage()
    # the fine-tuned backbone saw its training split (and the base what it saw): no later job
    # can measure on those
    seen = dict.fromkeys([*base.fold_of, *(images.digests[g] for g in train)], NEVER)
    return model.cpu().eval(), metrics, history, Lineage(fold_of=seen)


def _method(recipe: LayerRecipe, rows: Rows, history: list[dict]) -> str:
    if recipe.refits(rows.y):
        return "imprint+refit"
    return "imprint+train" if history else recipe.init


def _load_layer(head: Head, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        head.module.weight.copy_(weight.to(head.module.weight.dtype))
        if head.module.bias is not None:
            head.module.bias.copy_(bias.to(head.module.bias.dtype))


def _new_reference(images: Gathered, rows: Rows, cfg: ExpansionConfig) -> list[Kept]:
    """The new version's reference set: the base version's and the job's images of every
    label, at most ``reference_per_label`` per label."""
    groups = sorted(images.clean_row)
    candidates = [images.kept(g) for g in groups]
    features = rows.x[torch.tensor([images.clean_row[g] for g in groups], dtype=torch.long)]
    return select_reference(
        candidates,
        features,
        cfg.reference_per_label,
        cfg.reference_selection,
        cfg.training.seed,
    )


def _count_labels(kept: list[Kept]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k in kept:
        counts[k.label] = counts.get(k.label, 0) + 1
    return dict(sorted(counts.items()))


def _bias(head: Head) -> torch.Tensor:
    if head.module.bias is None:
        return torch.zeros(head.num_classes)
    return head.module.bias.detach().float().cpu()
