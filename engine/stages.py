"""The two ways a job fits its classifier layer, after the backbone has run: ``fit_and_measure``
(freeze=head: the layer fitted in closed form on cached features, every image measured by
cross-fitting) and ``fit_and_finetune`` (last_block/none: fine-tuned by epochs, measured on a
held-out split)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from engine.crossfit import cross_fit
from engine.data import eval_transform
from engine.evaluate import expansion_metrics
from engine.finetune import Finetuning, finetune, predict
from engine.gather import (
    JOB,
    Gathered,
    train_transform,
)
from engine.heads import Head, expand_head
from engine.lineage import NEVER, Lineage, near_duplicate_groups
from engine.recipe import LayerRecipe, Rows
from engine.refit import solver_report
from engine.request import (
    FINETUNE_BATCH_SETTING,
    Compute,
    ExpansionConfig,
    ExpansionRequest,
    Progress,
    ProgressFn,
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


def fit_and_measure(
    request: ExpansionRequest,
    model: nn.Module,
    head: Head,
    images: Gathered,
    rows: Rows,
    train: list[int],
    val: list[int],
    compute: Compute,
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
    if recipe.solves:
        metrics["refit"] = solver_report(recipe.solves)
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


def fit_and_finetune(
    request: ExpansionRequest,
    model: nn.Module,
    head: Head,
    images: Gathered,
    rows: Rows,
    train: list[int],
    val: list[int],
    compute: Compute,
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
    settings = Finetuning(cfg.freeze, cfg.training, num_workers=cfg.num_workers)
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
            replace(settings, training=replace(settings.training, batch_size=batch_size)),
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
        batch_size=settings.training.batch_size,
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
    if recipe.solves:
        metrics["refit"] = solver_report(recipe.solves)
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


def _bias(head: Head) -> torch.Tensor:
    if head.module.bias is None:
        return torch.zeros(head.num_classes)
    return head.module.bias.detach().float().cpu()
