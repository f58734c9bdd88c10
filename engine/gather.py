"""The images a job learns from and measures on, and their feature rows.

A job's images are its own uploads (of new and old labels) and the base version's reference
set, known by digest so that an image counts once however often it was uploaded. Reference
images whose features are cached for this backbone are not read at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from engine.data import (
    Augmentation,
    ImageDataset,
    Sample,
    augment_transform,
    eval_transform,
)
from engine.decoded import DecodedCache, filling
from engine.device_decode import DeviceBatches, plan
from engine.errors import DataError
from engine.features import Chained, FeatureCache, extract_features
from engine.heads import Head
from engine.preprocessing import Preprocessing
from engine.recipe import Rows
from engine.reference import Kept, ReferenceImage, conflicting, file_digest

JOB, REFERENCE = "job", "reference"


@dataclass
class Gathered:
    """One entry per distinct image (its *group* id is its position)."""

    labels: list[str]
    samples: list[Sample | None]  # None: a reference image known only by its cached features
    targets: torch.Tensor
    digests: list[str]
    sources: list[str]  # job | reference
    cached: dict[int, torch.Tensor]  # group -> cached clean features
    clean_row: dict[int, int] = field(default_factory=dict)  # group -> row (set by extract_rows)
    extracted: int = 0  # rows the backbone produced
    conflicts: list[dict] = field(default_factory=list)  # images under two labels, left out
    decoded: dict = field(default_factory=dict)  # what engine/decoded.py did (extract_rows)
    decoding: dict = field(default_factory=dict)  # where the clean views were decoded

    @property
    def cached_count(self) -> int:
        return len(self.cached)

    def reference_count(self) -> dict[str, int]:
        counts = Counter(
            self.labels[int(t)]
            for t, s in zip(self.targets, self.sources, strict=True)
            if s == REFERENCE
        )
        return dict(sorted(counts.items()))

    def kept(self, group: int) -> Kept:
        """The image as a member of a reference set; a path only where the store lacks it."""
        sample = self.samples[group]
        path = sample.path if sample is not None and self.sources[group] == JOB else None
        return Kept(self.digests[group], self.labels[int(self.targets[group])], path)

    def measurement(
        self,
        method: str,
        groups: torch.Tensor,
        labels: list[str],
        num_old: int,
        folds: int | None = None,
    ) -> dict:
        """What the figures rest on: how many images of each kind were measured, and which
        were not."""
        measured = set(groups.tolist())
        sources = [self.sources[g] for g in measured]
        old = sum(1 for g in measured if self.targets[g] < num_old)
        unmeasured = Counter(
            labels[int(self.targets[g])] for g in range(len(self.targets)) if g not in measured
        )
        return {
            "method": method,
            "folds": folds,
            "images": {
                JOB: self.sources.count(JOB),
                REFERENCE: self.sources.count(REFERENCE),
            },
            "measured": {
                "old": old,
                "new": len(measured) - old,
                "from_reference": sources.count(REFERENCE),
            },
            "unmeasured": dict(sorted(unmeasured.items())) if method == "cross_fitted" else {},
        }


def gather_images(
    samples: list[Sample],
    labels: list[str],
    num_old: int,
    reference_images: list[ReferenceImage],
    fetch: Callable[[list[ReferenceImage]], list[Sample]],
    cached_features: dict[str, torch.Tensor],
    dim: int,
) -> Gathered:
    """The job's images of known and new labels, then the reference images of old labels that
    the job did not upload itself; ``cached_features`` (by digest) spare reading an image.
    An image counts once by its bytes; one found under two labels (in the job, or in the job
    and the reference set) is left out everywhere and named in ``conflicts``: it cannot teach
    or measure either label."""
    index = {label: i for i, label in enumerate(labels)}
    old_labels = set(labels[:num_old])
    job = [(s, file_digest(s.path)) for s in samples if s.label in index]
    wanted = [r for r in dict.fromkeys(reference_images) if r.label in old_labels]
    conflicted = conflicting([(d, s.label) for s, d in job] + [(r.digest, r.label) for r in wanted])
    out = Gathered(labels, [], torch.empty(0), [], [], {})
    out.conflicts = [
        {
            "digest": d,
            "labels": conflicted[d],
            "files": [f"{s.path.parent.name}/{s.path.name}" for s, sd in job if sd == d],
        }
        for d in sorted(conflicted)
    ]
    seen: set[str] = set()
    targets: list[int] = []

    def add(sample: Sample | None, digest: str, label: str, source: str) -> None:
        seen.add(digest)
        out.samples.append(sample)
        out.digests.append(digest)
        out.sources.append(source)
        targets.append(index[label])

    for sample, digest in job:
        if digest not in seen and digest not in conflicted:
            add(sample, digest, sample.label, JOB)
    if not out.samples:
        raise DataError("none of the images belongs to a known or new label")
    wanted = [r for r in wanted if r.digest not in seen and r.digest not in conflicted]
    usable = {d: f for d, f in cached_features.items() if f.ndim == 1 and f.shape[0] == dim}
    for image in wanted:
        if image.digest in usable:
            out.cached[len(out.samples)] = usable[image.digest].float()
            add(None, image.digest, image.label, REFERENCE)
    missing = [r for r in wanted if r.digest not in usable]
    for image, sample in zip(missing, fetch(missing) if missing else [], strict=True):
        add(sample, image.digest, image.label, REFERENCE)
    out.targets = torch.tensor(targets, dtype=torch.long)
    return out


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(  # one set of workers for the images of a pass
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def train_transform(prep: Preprocessing, aug: Augmentation) -> Callable:
    return eval_transform(prep) if aug.is_identity else augment_transform(prep, aug)


def extract_rows(
    model: nn.Module,
    head: Head,
    images: Gathered,
    *,
    train: list[int],
    prep: Preprocessing,
    views: int,
    aug: Augmentation,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: torch.device,
    cache: FeatureCache,
    on_batch: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    dtype: torch.dtype | None = None,
    decoded: DecodedCache | None = None,
    decode: str = "auto",
) -> Rows:
    """Feature rows of every image: ``views`` rows (the clean view first) for the job's own
    training images, one clean row for reference and held-out images, and the cached rows.
    One DataLoader, one pass of the backbone (under autocast to ``dtype`` on a GPU). The clean
    views' pixels come from ``decoded`` when it holds these images, and are kept there when
    it does not (engine/decoded.py). ``decode`` says where the clean views are decoded
    (engine/device_decode.py: on a GPU, by nvJPEG)."""
    in_train = set(train)
    viewed = [
        g
        for g in range(len(images.samples))
        if g in in_train and images.sources[g] == JOB and images.samples[g] is not None
    ]
    augmented = set(viewed)
    plain = [
        g
        for g in range(len(images.samples))
        if images.samples[g] is not None and g not in augmented
    ]
    cached = sorted(images.cached)
    clean = eval_transform(prep)
    views = max(1, views)
    viewed_samples = [images.samples[g] for g in viewed]
    plain_samples = [images.samples[g] for g in plain]
    decoding = plan(decode, device, prep)
    digests = [images.digests[g] for g in viewed + plain]
    entry = decoded.entry(digests, prep, decoding.decoder) if decoded else None
    rows = entry.rows if entry else None
    plain_rows = rows.part(len(viewed)) if rows else None  # the same entry, after the viewed
    augmented_views = ImageDataset(
        viewed_samples,
        prep,
        train_transform(prep, aug),
        views,
        first_view=clean,
        seed=seed,
        decoded=rows,
    )
    made: list[DeviceBatches] = []
    if decoding.on_device:  # clean views made on the device; augmented ones by the loaders
        made = [
            DeviceBatches(
                samples,
                prep,
                device,
                batch_size,
                threads=num_workers,
                rows=part,
                jpeg_on_device=decoding.jpeg_on_device,
            )
            for samples, part in (
                (viewed_samples, rows),
                (plain_samples, plain_rows),
            )
        ]
        extra = Subset(augmented_views, range(len(viewed), len(viewed) * views))
        loader: DataLoader | Chained = Chained(
            [made[0], _loader(extra, batch_size, num_workers, device), made[1]]
            if len(extra)
            else made
        )
    else:
        plain_views = ImageDataset(plain_samples, prep, clean, decoded=plain_rows)
        loader = _loader(
            ConcatDataset([augmented_views, plain_views]), batch_size, num_workers, device
        )
    total = len(viewed) * views + len(plain)
    with filling(entry):
        feats, local = extract_features(
            model,
            head,
            loader,
            device,
            on_batch,
            should_stop,
            lambda n, dim: cache.allocate(n + len(cached), dim),
            dtype,
        )
    if entry:
        images.decoded = entry.report()
    images.decoding = decoding.report(made)
    if not total:
        feats = cache.allocate(len(cached), head.in_features)
    with torch.inference_mode():  # the rows were allocated as inference tensors
        for i, g in enumerate(cached):
            feats[total + i] = images.cached[g]
    n_viewed = len(viewed) * views
    group = torch.cat(
        [
            torch.tensor(viewed, dtype=torch.long)[local[:n_viewed]]
            if n_viewed
            else torch.empty(0, dtype=torch.long),
            torch.tensor(plain, dtype=torch.long)[local[n_viewed:]]
            if total > n_viewed
            else torch.empty(0, dtype=torch.long),
            torch.tensor(cached, dtype=torch.long),
        ]
    )
    is_clean = torch.ones(len(group), dtype=torch.bool)
    is_clean[len(viewed) : n_viewed] = False
    images.extracted = total
    images.clean_row = {int(g): r for r, g in enumerate(group.tolist()) if is_clean[r]}
    return Rows(feats, images.targets[group], group, is_clean)
