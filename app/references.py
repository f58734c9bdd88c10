"""Reference sets: the images of its labels that a model version keeps, so that later jobs can
learn from and measure old labels even when the user uploads only new-label images.

Where they are stored: ``core.reference_store``.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.datasets import get_dataset
from core.errors import Conflict, Invalid, NotFound
from core.models import Dataset, ModelVersion
from core.reference_store import (
    Entry,
    image_key,
    read_manifest,
    store_image,
    write_manifest,
)
from core.scratch import scratch
from core.storage import Storage


def cap_per_label(entries: list[Entry], per_label: int, seed: str) -> list[Entry]:
    """Distinct entries, at most ``per_label`` of each label, picked at random (seeded, so the
    same request picks the same images) where a label has more."""
    by_label: dict[str, list[Entry]] = defaultdict(list)
    for entry in dict.fromkeys(entries):
        by_label[entry[1]].append(entry)
    rng = random.Random(seed)
    kept: list[Entry] = []
    for label in sorted(by_label):
        items = by_label[label]
        if len(items) > per_label:
            chosen = set(rng.sample(range(len(items)), per_label))
            items = [e for i, e in enumerate(items) if i in chosen]
        kept.extend(items)
    return kept


def _dataset_images(
    storage: Storage, dataset: Dataset, labels: set[str], workdir: Path
) -> dict[Entry, Path]:
    """The dataset's images of ``labels``, copied to ``workdir``, by (digest, label)."""
    found: dict[Entry, Path] = {}
    with tarfile.open(storage.local_path(dataset.storage_key)) as tar:
        for n, member in enumerate(tar):
            parts = PurePosixPath(member.name).parts
            if not member.isreg() or len(parts) != 2 or parts[0] not in labels:
                continue
            data = tar.extractfile(member).read()
            path = workdir / f"{n:07d}"
            path.write_bytes(data)
            found.setdefault((hashlib.sha256(data).hexdigest(), parts[0]), path)
    return found


def extend_reference(
    storage: Storage,
    model_id: str,
    version_id: str,
    current: dict[str, Any] | None,
    dataset: Dataset,
    labels: set[str],
    per_label: int,
    tmp_root: Path,
) -> tuple[dict[str, Any] | None, dict[str, int], list[str]]:
    """A version's reference set with the dataset's images of ``labels`` added, capped per
    label: ``(new reference, added per label, keys of images stored for it)``; the new
    reference is None when nothing changed. Nothing of the version row changes here; the caller
    swaps the reference in."""
    existing = read_manifest(storage, current)
    with scratch(tmp_root, prefix="reference-") as tmp:
        offered = _dataset_images(storage, dataset, labels, tmp)
        kept = cap_per_label(existing + list(offered), per_label, seed=f"{version_id}:{dataset.id}")
        if kept == existing:
            return None, {}, []
        known = set(existing)
        new = [entry for entry in kept if entry not in known]
        uploaded = [
            image_key(model_id, digest)
            for digest, label in new
            if store_image(storage, model_id, digest, offered[(digest, label)])
        ]
    reference = write_manifest(storage, model_id, version_id, kept, tmp_root)
    added = Counter(label for _, label in new)
    return reference, dict(sorted(added.items())), uploaded


def dataset_for_reference(session: Session, owner: str, dataset_id: str, field: str) -> Dataset:
    """The owner's dataset, or a 422 naming ``field`` (the id is part of the request body)."""
    try:
        return get_dataset(session, owner, dataset_id)
    except NotFound:
        raise Invalid(f"no dataset {dataset_id!r}", field) from None


def add_reference(
    session: Session,
    storage: Storage,
    version: ModelVersion,
    dataset: Dataset,
    per_label: int,
    tmp_root: Path,
) -> tuple[dict[str, int], list[str], str | None]:
    """Add the dataset's images of the version's labels to its reference set:
    ``(added per label, labels of the dataset that were not the version's, the replaced
    manifest's key)``. The replaced manifest is the caller's to delete once committed."""
    matching = set(dataset.labels) & set(version.labels)
    ignored = sorted(set(dataset.labels) - set(version.labels))
    if not matching:
        raise Invalid(
            f"none of the dataset's labels ({', '.join(sorted(dataset.labels)[:10])}) is a label "
            f"of version {version.version}",
            "dataset_id",
        )
    revision, current = version.reference_revision, version.reference
    reference, added, _ = extend_reference(
        storage,
        version.model_id,
        version.id,
        current,
        dataset,
        matching,
        per_label,
        tmp_root,
    )
    if reference is None:
        return {}, ignored, None
    swapped = session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == version.id, ModelVersion.reference_revision == revision)
        .values(reference=reference, reference_revision=revision + 1)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not swapped:
        storage.delete(reference["manifest"]["key"])
        raise Conflict("the reference set changed while this request ran; retry")
    session.refresh(version)
    replaced = (current or {}).get("manifest", {}).get("key")
    return added, ignored, replaced
