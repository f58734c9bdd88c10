"""Run the frozen backbone once per image (per view) and keep what enters the classifier."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.device import autocast_for, float32_head, pick_device
from engine.errors import DataError, JobCancelled, UnsupportedHead
from engine.heads import Head

__all__ = ["Chained", "FeatureCache", "autocast_for", "extract_features", "pick_device"]

BatchDone = Callable[[int, int], None]  # (images done, images total)


class FeatureCache:
    """Allocates the tensors cached features go to: in memory up to ``memory_bytes`` in all,
    beyond it as files memory-mapped from ``directory``, so a dataset whose features do not fit
    in RAM still trains (from the page cache, at disk speed). ``close()`` deletes the files."""

    def __init__(self, memory_bytes: int, directory: Path | None = None) -> None:
        self.memory_bytes = memory_bytes
        self.directory = directory
        self.in_memory = 0
        self.files: list[Path] = []

    def allocate(self, rows: int, dim: int) -> torch.Tensor:
        size = rows * dim * 4
        if self.in_memory + size <= self.memory_bytes:
            self.in_memory += size
            return torch.empty(rows, dim)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="features-", suffix=".f32", dir=self.directory)
        os.close(fd)
        self.files.append(Path(name))
        mapped = np.memmap(name, dtype=np.float32, mode="w+", shape=(max(rows, 1), dim))
        return torch.from_numpy(mapped)[:rows]

    def mark(self) -> tuple[int, int]:
        """Where the allocations stand, for ``release_since``."""
        return self.in_memory, len(self.files)

    def release_since(self, mark: tuple[int, int]) -> None:
        """Forget what was allocated after ``mark`` (an attempt that failed and is tried
        again): its memory no longer counts against the budget and its files are deleted."""
        in_memory, files = mark
        self.in_memory = in_memory
        for path in self.files[files:]:
            path.unlink(missing_ok=True)
        del self.files[files:]

    @property
    def spilled_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())

    def close(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass
class Chained:
    """Batch sources one after another, as one loader for ``extract_features``."""

    parts: list[Iterable]

    @property
    def dataset(self) -> range:
        return range(sum(len(part.dataset) for part in self.parts))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for part in self.parts:
            batches = iter(part)
            try:
                yield from batches
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()


def _in_memory(rows: int, dim: int) -> torch.Tensor:
    return torch.empty(rows, dim)


def extract_features(
    model: nn.Module,
    head: Head,
    loader: DataLoader,
    device: torch.device,
    on_batch: BatchDone | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    allocate: Callable[[int, int], torch.Tensor] = _in_memory,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, indices)``: the classifier layer's float32 inputs, one row per loader item
    (``loader``: a DataLoader, or batches made on the device, engine/device_decode.py),
    written into a tensor from ``allocate(rows, dim)`` (see :class:`FeatureCache`). On a GPU
    the backbone runs under autocast to ``dtype`` (default: the ``auto`` choice, see
    ``device.autocast_dtype``); its features are cast to float32 before the classifier layer,
    which runs in float32.

    On the first batch it checks that the classifier layer's output *is* the model's output;
    otherwise training the layer on cached features would not be training the model.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured["input"], captured["output"] = args[0], output

    hook = head.module.register_forward_hook(keep)
    feats: torch.Tensor | None = None
    indices = []
    total, done = len(loader.dataset), 0
    # channels_last: convolutions run 1.3-1.4x faster on CPUs and tensor cores alike. The
    # parameters are converted outside inference mode, so that they stay trainable.
    model.to(device, memory_format=torch.channels_last).eval()
    batches = None
    try:
        batches = iter(loader)
        with torch.inference_mode(), float32_head(model, head):
            for batch, index in batches:
                if should_stop():
                    raise JobCancelled()
                batch = batch.to(device, non_blocking=True)
                if batch.ndim == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast_for(device, dtype):
                    logits = model(batch)
                rows = captured["input"].flatten(1).cpu()  # float32: see float32_head
                if feats is None:
                    _check_head_is_output(captured, logits)
                    feats = allocate(total, rows.shape[1])
                if not torch.isfinite(rows).all():
                    raise DataError("the model produced non-finite features for these images")
                feats[done : done + len(rows)] = rows
                indices.append(index)
                done += len(index)
                if on_batch:
                    on_batch(done, total)
    finally:
        close = getattr(batches, "close", None)  # a generator's threads (device_decode.py)
        if close is not None:
            close()
        hook.remove()
        model.to(memory_format=torch.contiguous_format)
    if feats is None:
        return torch.empty(0, head.in_features), torch.empty(0, dtype=torch.long)
    return feats, torch.cat(indices)


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
