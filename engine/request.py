"""What a job asks of the engine and what it gets back: the request, its config, the result,
progress, and where the backbone runs (``Compute``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from engine.calibrate import Calibration
from engine.data import Augmentation, Sample
from engine.decoded import DecodedCache
from engine.device import (
    DEFAULT_PRECISION,
    halving_on_oom,
)
from engine.lineage import Lineage
from engine.preprocessing import Preprocessing
from engine.reference import (
    Kept,
    ReferenceSet,
)
from engine.refit import Refit
from engine.train import HeadTraining

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
    decoded: DecodedCache | None = None  # clean views' pixels kept between jobs (decoded.py)
    decode: str = "auto"  # where clean views are decoded: auto | device | loaders (device_decode)
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
class Compute:
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
