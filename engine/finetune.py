"""Unfreezing more than the classifier layer: ``last_block`` or ``none``.

The backbone then learns too, at a hundredth of the head's learning rate, and a frozen copy of the
original model (the teacher) keeps it honest: the old-class logits are distilled towards the
teacher's (learning without forgetting, LwF). Everything stays in eval mode, so BatchNorm
statistics and dropout do not move on a few images; only gradients flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from engine.data import ImageDataset, Sample
from engine.device import autocast_for, compute_dtype, float32_head, grad_scaler
from engine.errors import JobCancelled, UnsupportedHead
from engine.heads import Head, find_head
from engine.preprocessing import Preprocessing
from engine.train import HeadTraining, balanced_class_weights


@dataclass(frozen=True)
class Finetuning:
    """The backbone fine-tuned with the classifier layer: the layer's training settings (its
    epochs, rate, batch, seed, and how the old rows move), which blocks are unfrozen, how much
    slower they learn, and the loader's processes."""

    policy: str  # last_block | none
    training: HeadTraining
    backbone_lr_scale: float = 0.01
    num_workers: int = 0  # loader processes decoding images, on a GPU only (as on CPU: none)


def image_loader(
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    passes: int = 1,
) -> DataLoader:
    """A loader feeding the model on ``device``: on a GPU, ``num_workers`` processes decode
    images into pinned memory (kept alive across ``passes`` > 1 epochs) while it computes; on
    a CPU the images are decoded in the loop, as they always were."""
    workers = num_workers if device.type == "cuda" else 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0 and passes > 1,
    )


def trainable_backbone(model: nn.Module, head: Head, policy: str) -> list[nn.Parameter]:
    """The backbone parameters a policy unfreezes: all of them (``none``), or those of the last
    parameterised block before the classifier layer (``last_block``)."""
    head_params = {id(p) for p in head.module.parameters()}
    if policy == "none":
        return [p for p in model.parameters() if id(p) not in head_params]
    top = head.path.split(".")[0]
    blocks = [
        (name, m)
        for name, m in model.named_children()
        if name != top and any(True for _ in m.parameters())
    ]
    names = [name for name, _ in model.named_children()]
    earlier = (
        [m for name, m in blocks if names.index(name) < names.index(top)]
        if top in names
        else [m for _, m in blocks]
    )
    if not earlier:
        raise UnsupportedHead("no block before the classifier layer to unfreeze")
    block = earlier[-1]
    if isinstance(block, nn.Sequential | nn.ModuleList) and len(block):
        block = block[-1]
    return [p for p in block.parameters() if id(p) not in head_params]


def finetune(
    model: nn.Module,
    head: Head,
    teacher: nn.Module,
    samples: Sequence[Sample],
    targets: torch.Tensor,
    num_old: int,
    cfg: Finetuning,
    prep: Preprocessing,
    transform: Callable,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    dtype: torch.dtype | None = None,
) -> list[dict]:
    """Train the unfrozen block and the classifier layer end to end; returns the history.

    On a GPU the model runs under autocast to ``dtype`` (default: the ``auto`` choice), the
    classifier layer and the loss in float32; under fp16 the loss is scaled (``GradScaler``).

    With ``old_rows_frozen`` the old rows of the classifier layer are put back after every
    step, so they stay bit-identical (their logits still move with the features, which the
    distillation term holds near the teacher's); trainable, they keep ``old_rows_lr_scale``
    of each step, as on the cached-feature path.
    """
    train = cfg.training
    model.requires_grad_(False).to(device).eval()
    teacher.requires_grad_(False).to(device).eval()
    backbone = trainable_backbone(model, head, cfg.policy)
    head_params = list(head.module.parameters())
    for p in backbone + head_params:
        p.requires_grad_(True)
    layer = head.module
    old_rows = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    keep = 0.0 if train.old_rows_frozen else train.old_rows_lr_scale
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone, "lr": train.learning_rate * cfg.backbone_lr_scale},
            {"params": head_params, "lr": train.learning_rate},
        ],
        weight_decay=train.weight_decay,
    )
    class_weights = balanced_class_weights(targets, head.module.out_features).to(device)
    generator = torch.Generator().manual_seed(train.seed)
    loader = image_loader(
        ImageDataset(samples, prep, transform),
        train.batch_size,
        device,
        cfg.num_workers,
        shuffle=True,
        generator=generator,
        passes=train.epochs,
    )
    scaler = grad_scaler(device, _dtype(device, dtype))
    history = []
    t = train.temperature
    with float32_head(model, head), float32_head(teacher, find_head(teacher)):
        for epoch in range(1, train.epochs + 1):
            total, seen = 0.0, 0
            for batch, index in loader:
                if should_stop():
                    raise JobCancelled()
                batch = batch.to(device, non_blocking=True)
                y = targets[index].to(device, non_blocking=True)
                with autocast_for(device, _dtype(device, dtype)):  # float32 on a CPU
                    logits = model(batch)
                    with torch.no_grad():
                        taught = teacher(batch)
                loss = F.cross_entropy(logits, y, weight=class_weights)
                if num_old and train.distillation_weight:
                    loss = loss + train.distillation_weight * t * t * F.kl_div(
                        F.log_softmax(logits[:, :num_old] / t, dim=1),
                        F.softmax(taught / t, dim=1),
                        reduction="batchmean",
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                before = [p.detach()[:num_old].clone() for p in old_rows]
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed
                scaler.update()
                with torch.no_grad():
                    for p, was in zip(old_rows, before, strict=True):
                        p[:num_old] = was + keep * (p[:num_old] - was)
                total += loss.item() * len(index)
                seen += len(index)
            record = {
                "epoch": epoch,
                "train_loss": total / max(seen, 1),
                "val_accuracy": None,
                "stage": "finetune",
            }
            history.append(record)
            if on_epoch:
                on_epoch(record)
    model.requires_grad_(False)
    return history


def _dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return dtype if dtype is not None else compute_dtype(device)


@torch.inference_mode()
def predict(
    model: nn.Module,
    samples: Sequence[Sample],
    prep: Preprocessing,
    transform: Callable,
    device: torch.device,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """The model's predictions: the backbone under autocast to ``dtype`` on a GPU (float32 on
    a CPU, as fine-tuning there), the classifier layer in float32 on float32 features (as
    exported)."""
    loader = image_loader(ImageDataset(samples, prep, transform), batch_size, device, num_workers)
    model.to(device).eval()
    out = []
    with float32_head(model, find_head(model)):
        for batch, _ in loader:
            with autocast_for(device, _dtype(device, dtype)):
                logits = model(batch.to(device, non_blocking=True))
            out.append(logits.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
