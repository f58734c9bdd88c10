"""A model version's reference set: images of its labels that the service keeps, so that every
later job has old-label images to learn from and to measure retention on, even when the user
uploads only images of the new labels.

Images are known by the sha256 of their bytes (their *digest*): the same image uploaded twice,
or kept by a parent version and uploaded again, counts once. With a frozen backbone the
features of an image never change, so they are cached per backbone (its *fingerprint*) and a
later job reads them instead of running the backbone again.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.data import Sample, scan_image_folder
from engine.heads import Head
from engine.preprocessing import Preprocessing

SELECTIONS = ("random", "herding")


@dataclass(frozen=True)
class ReferenceImage:
    digest: str
    label: str


@dataclass
class ReferenceSet:
    """The base version's reference images, and how to get at them.

    ``fetch`` turns images into local files (only the ones whose features are not cached are
    asked for); ``cached_features(fingerprint)`` answers the cached features of a backbone,
    by digest.
    """

    images: list[ReferenceImage]
    fetch: Callable[[list[ReferenceImage]], list[Sample]]
    cached_features: Callable[[str], dict[str, torch.Tensor]] = field(default=lambda _: {})

    @staticmethod
    def from_folder(root: Path) -> ReferenceSet:
        """An ImageFolder on disk as a reference set (no cache): for tests and benchmarks."""
        samples = scan_image_folder(root)
        by_key = {(file_digest(s.path), s.label): s for s in samples}
        images = [ReferenceImage(d, label) for d, label in by_key]
        return ReferenceSet(images, lambda wanted: [by_key[(r.digest, r.label)] for r in wanted])


@dataclass(frozen=True)
class Kept:
    """An image of the new version's reference set; ``path`` is set for images that the
    store does not hold yet (the job's own uploads)."""

    digest: str
    label: str
    path: Path | None


def conflicting(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """The digests of ``(digest, label)`` pairs that come under more than one label, each with
    its labels: an image cannot be an example of two labels."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for digest, label in pairs:
        labels_of[digest].add(label)
    return {d: sorted(found) for d, found in labels_of.items() if len(found) > 1}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_fingerprint(
    model: nn.Module, head: Head, prep: Preprocessing, dtype: torch.dtype = torch.float32
) -> str:
    """Identifies what turns an image into the classifier layer's input: every parameter and
    buffer outside the classifier layer, the preprocessing, and the dtype the backbone runs in
    (features computed under bf16 or fp16 autocast are rounded: they are cached apart from
    float32 ones, whose fingerprint names no dtype). Two versions with the same fingerprint
    give the same features for the same image."""
    digest = hashlib.sha256(repr(sorted(prep.to_dict().items())).encode())
    if dtype != torch.float32:
        digest.update(f"autocast:{dtype}".encode())
    skip = f"{head.path}."
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(skip):
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:32]


def herding(features: torch.Tensor, k: int) -> list[int]:
    """iCaRL's herding: greedily pick the rows whose running mean stays closest to the mean of
    all rows (features L2-normalised). Returns ``k`` row indices in the order picked."""
    x = F.normalize(features.float(), dim=1)
    target = x.mean(dim=0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(x), dtype=torch.bool)
    for step in range(1, min(k, len(x)) + 1):
        distance = ((target - (total + x) / step) ** 2).sum(dim=1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        total += x[pick]
    return chosen


def select_reference(
    candidates: Sequence[Kept],
    features: torch.Tensor,
    per_label: int,
    method: str = "random",
    seed: int = 0,
) -> list[Kept]:
    """At most ``per_label`` images of each label: a random sample of each (an unbiased
    sample, so the retention measured on it is unbiased too), or picked by herding on
    ``features`` (one row per candidate; prototypical images, which measure optimistically)."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; expected one of {SELECTIONS}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, kept in enumerate(candidates):
        by_label[kept.label].append(i)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[Kept] = []
    for label in sorted(by_label):
        rows = by_label[label]
        if len(rows) > per_label:
            if method == "herding":
                rows = [rows[i] for i in herding(features[rows], per_label)]
            else:
                order = torch.randperm(len(rows), generator=generator)[:per_label]
                rows = [rows[i] for i in sorted(order.tolist())]
        chosen.extend(candidates[i] for i in rows)
    return chosen
