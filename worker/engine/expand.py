"""Teach a trained classifier new labels: the engine's one entry point.

    result = expand_classifier(request, progress=print_progress)
    save_safetensors(path, result.model, {...})

Every layer but the classifier is frozen (eval mode, so BatchNorm statistics stay put); the
backbone runs once per image and view, and the classifier layer is trained on those cached
features. Old rows are copied bit-exactly and, by default, never trained.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from worker.engine.architectures import Preprocessing
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
from worker.engine.features import extract_features, pick_device
from worker.engine.finetune import Finetuning, finetune, predict
from worker.engine.heads import Head, expand_head
from worker.engine.train import HeadTraining, calibrate_new_bias, imprint_rows, train_head
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
    train_x, train_y, val_x, val_y = _extract(
        model,
        head,
        samples,
        targets,
        train_idx,
        val_idx,
        request.preprocessing,
        cfg,
        device,
        progress,
        should_stop,
    )
    extract_s = time.perf_counter() - started

    progress(Progress("training", 0.0, 0, cfg.training.epochs))
    weight = torch.cat(
        [head.module.weight.detach().float().cpu(), torch.zeros(len(new_classes), head.in_features)]
    )
    old_bias = _bias(head)
    bias = torch.cat([old_bias, torch.zeros(len(new_classes))])
    if cfg.init == "imprint":
        weight[num_old:] = imprint_rows(train_x, train_y, new_classes, weight[:num_old])
        bias[num_old:] = calibrate_new_bias(train_x, train_y, weight, bias, num_old, new_classes)
    else:
        torch.nn.init.normal_(weight[num_old:], std=weight[:num_old].std().item())
    has_negatives = bool((train_y < num_old).any())
    history: list[dict] = []
    if has_negatives and cfg.training.epochs > 0:

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

        weight, bias, history = train_head(
            weight,
            bias,
            train_x,
            train_y,
            num_old,
            cfg.training,
            validation=(val_x, val_y),
            on_epoch=on_epoch,
            should_stop=should_stop,
        )
    train_s = time.perf_counter() - started - extract_s

    progress(Progress("evaluating", 0.0))
    before = (val_x @ head.module.weight.detach().float().cpu().T + old_bias).argmax(dim=1)
    after = (val_x @ weight.T + bias).argmax(dim=1)
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
        "device": str(device),
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
    progress: ProgressFn,
    should_stop: Callable[[], bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features for the training views and the validation images, in one progress bar."""
    views = max(1, cfg.augmentation.views)
    clean = eval_transform(prep)
    augmented = clean if cfg.augmentation.is_identity else augment_transform(prep, cfg.augmentation)
    train_samples = [samples[i] for i in train_idx]
    val_samples = [samples[i] for i in val_idx]
    jobs = [(train_samples, clean, 1), (val_samples, clean, 1)]
    if views > 1:
        jobs.insert(1, (train_samples, augmented, views - 1))
    total = sum(len(s) * v for s, _, v in jobs)
    done_before = 0
    outputs = []
    for subset, transform, n_views in jobs:
        if not subset:
            outputs.append((torch.empty(0, head.in_features), torch.empty(0, dtype=torch.long)))
            continue
        loader = DataLoader(
            ImageDataset(subset, prep, transform, n_views),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        offset = done_before

        def on_batch(done: int, _total: int, offset: int = offset) -> None:
            progress(
                Progress(
                    "extracting", (offset + done) / total, message=f"{offset + done}/{total} images"
                )
            )

        feats, local = extract_features(model, head, loader, device, on_batch, should_stop)
        outputs.append((feats, local))
        done_before += len(subset) * n_views
    train_t = targets[train_idx]
    val_t = targets[val_idx]
    parts_x = [outputs[0][0]] + ([outputs[1][0]] if views > 1 else [])
    parts_y = [train_t[outputs[0][1]]] + ([train_t[outputs[1][1]]] if views > 1 else [])
    val_x, val_local = outputs[-1]
    val_y = val_t[val_local] if len(val_local) else val_t[:0]
    if not math.isfinite(float(torch.cat(parts_x).abs().sum())):
        raise DataError("the model produced non-finite features for these images")
    return torch.cat(parts_x), torch.cat(parts_y), val_x, val_y
