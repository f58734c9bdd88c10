"""The worker's side of reference sets: hand the engine the base version's set, keep the new
version's, and cache features per backbone (layout: ``app.references``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from core.reference_store import (
    features_key,
    image_key,
    read_manifest,
    store_image,
    write_manifest,
)
from core.storage import Storage
from engine.data import Sample
from engine.expand import ExpansionResult
from engine.reference import ReferenceImage, ReferenceSet

log = logging.getLogger(__name__)


def base_reference(
    storage: Storage, model_id: str, reference: dict[str, Any] | None, folder: Path
) -> ReferenceSet | None:
    """The engine's view of a version's reference set: images are downloaded into ``folder``
    only when their features are not cached."""
    entries = read_manifest(storage, reference)
    if not entries:
        return None

    def fetch(images: list[ReferenceImage]) -> list[Sample]:
        folder.mkdir(parents=True, exist_ok=True)
        samples = []
        for n, image in enumerate(images):
            path = folder / f"{n:07d}"
            with storage.open(image_key(model_id, image.digest)) as src, path.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            samples.append(Sample(path, image.label))
        return samples

    return ReferenceSet(
        [ReferenceImage(d, label) for d, label in entries],
        fetch,
        lambda fingerprint: load_features(storage, model_id, fingerprint),
    )


def load_features(storage: Storage, model_id: str, fingerprint: str) -> dict[str, torch.Tensor]:
    """Cached features of a backbone by image digest; empty when there are none (or the file
    is unreadable: a cache is never worth failing a job for)."""
    key = features_key(model_id, fingerprint)
    try:
        if not storage.exists(key):
            return {}
        path = storage.local_path(key)
        with safetensors.safe_open(str(path), framework="pt") as f:
            digests = json.loads(f.metadata()["digests"])
            features = f.get_tensor("features")
    except Exception:  # noqa: BLE001
        log.warning("feature cache %s is unreadable; extracting instead", key, exc_info=True)
        return {}
    return dict(zip(digests, features, strict=True))


def save_features(
    storage: Storage,
    model_id: str,
    fingerprint: str,
    features: dict[str, torch.Tensor],
    keep: set[str],
    tmp: Path,
) -> int:
    """Add ``features`` of the images in ``keep`` to the backbone's cache file; rewritten only
    when it gains rows. Returns the rows added."""
    cached = load_features(storage, model_id, fingerprint)
    fresh = {d: f for d, f in features.items() if d in keep and d not in cached}
    if not fresh:
        return 0
    merged = {d: f for d, f in cached.items() if d in keep} | fresh
    digests = sorted(merged)
    path = tmp / "features.safetensors"
    safetensors.torch.save_file(
        {"features": torch.stack([merged[d].float() for d in digests]).contiguous()},
        str(path),
        metadata={"digests": json.dumps(digests), "fingerprint": fingerprint},
    )
    storage.put_file(features_key(model_id, fingerprint), path)
    return len(fresh)


def keep_reference(
    storage: Storage,
    model_id: str,
    version_id: str,
    result: ExpansionResult,
    tmp: Path,
) -> dict[str, Any] | None:
    """Store the new version's reference set: the job's own images it keeps, and a manifest
    (returned as the version's ``reference``; its key is the caller's to discard on failure).
    Images are stored by digest and shared by the versions that keep them, so they are not
    removed with a failed attempt."""
    if not result.reference:
        return None
    for kept in result.reference:
        if kept.path is not None:
            store_image(storage, model_id, kept.digest, kept.path)
    entries = [(kept.digest, kept.label) for kept in result.reference]
    return write_manifest(storage, model_id, version_id, entries, tmp)


def cache_features(
    storage: Storage,
    model_id: str,
    base_reference_digests: set[str],
    result: ExpansionResult,
    tmp: Path,
) -> None:
    """Best effort: keep the features of the base's and (if the backbone did not change) the
    new version's reference images, so that the next job reads them instead of the images."""
    keep = set(base_reference_digests)
    if not result.backbone_changed:
        keep |= {kept.digest for kept in result.reference}
    try:
        added = save_features(storage, model_id, result.fingerprint, result.features, keep, tmp)
    except Exception:  # noqa: BLE001
        log.warning("could not update the feature cache of model %s", model_id, exc_info=True)
        return
    if added:
        log.info("feature cache of model %s: %d images added", model_id, added)
