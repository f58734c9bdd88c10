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

import time
import traceback
from collections.abc import Callable

import torch

from engine.data import stratified_split
from engine.device import (
    backbone_dtype,
    compute_dtype,
    pick_device,
    precision_name,
    release_memory,
)
from engine.errors import EngineError
from engine.families import family_of
from engine.features import FeatureCache
from engine.gather import (
    REFERENCE,
    Gathered,
    extract_rows,
    gather_images,
)
from engine.recipe import Rows
from engine.reference import (
    Kept,
    backbone_fingerprint,
    select_reference,
)
from engine.request import (  # noqa: F401  (the engine's entry point names them too)
    EXTRACT_BATCH_SETTING,
    FINETUNE_BATCH_SETTING,
    Compute,
    ExpansionConfig,
    ExpansionRequest,
    ExpansionResult,
    Progress,
    ProgressFn,
)
from engine.stages import fit_and_finetune, fit_and_measure
from engine.weights import load_classifier


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
    compute = Compute(device, compute_dtype(device, cfg.precision), cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(Progress("loading", 0.0, message=f"building {request.architecture}"))
    model, head = load_classifier(request.architecture, len(request.labels), request.weights)
    model.requires_grad_(False)
    compute.dtype = backbone_dtype(compute.dtype, device, model)
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
            decoded=cfg.decoded,
            decode=cfg.decode,
        )

    rows = compute.run("extract", "extracting features", extract, progress, "extracting")
    extract_s = time.perf_counter() - started

    stage = fit_and_measure if not tuned else fit_and_finetune
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
        "decoded_cache": images.decoded or {"state": "off"},
        "decoding": images.decoding,
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
