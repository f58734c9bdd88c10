"""Reference sets in the artifact store: where their images, manifests and features live.

* ``models/<model>/reference/<digest>``: every image once per model, named by its sha256; the
  service's own copy, so deleting a dataset never breaks a version;
* ``models/<model>/<version>/reference-<id>.json``: a version's set, ``{"images": [{digest,
  label}, ...]}``; its counts per label are on the version row;
* ``models/<model>/features/<fingerprint>.safetensors``: features of reference images computed
  by one backbone (worker side, see ``engine.reference``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from core.models import new_id
from core.scratch import scratch
from core.storage import Storage

Entry = tuple[str, str]  # (digest, label)


def image_key(model_id: str, digest: str) -> str:
    return f"models/{model_id}/reference/{digest}"


def features_key(model_id: str, fingerprint: str) -> str:
    return f"models/{model_id}/features/{fingerprint}.safetensors"


def read_manifest(storage: Storage, reference: dict[str, Any] | None) -> list[Entry]:
    """The (digest, label) pairs of a version's reference set; empty if it has none."""
    if not reference or not reference.get("manifest"):
        return []
    with storage.open(reference["manifest"]["key"]) as f:
        images = json.load(f)["images"]
    return [(item["digest"], item["label"]) for item in images]


def write_manifest(
    storage: Storage, model_id: str, version_id: str, entries: list[Entry], tmp_root: Path
) -> dict[str, Any]:
    """Store a reference set's manifest; the value of ``ModelVersion.reference``."""
    body = {"images": [{"digest": d, "label": label} for d, label in entries]}
    with scratch(tmp_root, prefix="reference-") as tmp:
        path = tmp / "reference.json"
        path.write_text(json.dumps(body, separators=(",", ":")))
        stored = storage.put_file(f"models/{model_id}/{version_id}/reference-{new_id()}.json", path)
    counts = Counter(label for _, label in entries)
    return {"labels": dict(sorted(counts.items())), "manifest": stored.__dict__}


def store_image(storage: Storage, model_id: str, digest: str, path: Path) -> bool:
    """Keep an image under its digest; True if it was not stored yet."""
    key = image_key(model_id, digest)
    if storage.exists(key):
        return False
    storage.put_file(key, path)
    return True
