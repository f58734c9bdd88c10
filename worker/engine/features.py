"""Run the frozen backbone once per image (per view) and keep what enters the classifier."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from worker.engine.errors import JobCancelled, UnsupportedHead
from worker.engine.heads import Head

BatchDone = Callable[[int, int], None]  # (images done, images total)


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it, fp16 on older ones, nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    head: Head,
    loader: DataLoader,
    device: torch.device,
    on_batch: BatchDone | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, indices)``: the classifier layer's float32 inputs, one row per loader item.

    On the first batch it checks that the classifier layer's output *is* the model's output;
    otherwise training the layer on cached features would not be training the model.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured["input"], captured["output"] = args[0], output

    hook = head.module.register_forward_hook(keep)
    feats, indices = [], []
    total, done = len(loader.dataset), 0
    try:
        model.to(device).eval()
        for batch, index in loader:
            if should_stop():
                raise JobCancelled()
            batch = batch.to(device, non_blocking=True)
            if batch.ndim == 4 and device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_for(device):
                logits = model(batch)
            if not feats:
                _check_head_is_output(captured, logits)
            feats.append(captured["input"].float().flatten(1).cpu())
            indices.append(index)
            done += len(index)
            if on_batch:
                on_batch(done, total)
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(indices)


def _check_head_is_output(captured: dict[str, torch.Tensor], logits: object) -> None:
    if "input" not in captured:
        raise UnsupportedHead("the classifier layer is not used in the model's forward pass")
    if captured["input"].ndim != 2:
        raise UnsupportedHead(
            "the classifier layer sees unpooled features of shape "
            f"{list(captured['input'].shape[1:])}; Graft expands pooled classifier layers"
        )
    if not isinstance(logits, torch.Tensor) or not torch.equal(captured["output"], logits):
        raise UnsupportedHead(
            "the model transforms the classifier layer's output before returning it"
        )
