"""A model's versions in the store and the database: the files of a version, each run in its
own runtime before it is kept, and the next version number, taken one at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import __version__
from core.models import Model, ModelVersion, VersionStatus, new_id
from core.storage import Storage, StoredObject
from engine.artifacts import write_artifacts
from engine.formats import SUFFIXES
from engine.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def artifact_metadata(
    name: str, architecture: str, labels: list[str], preprocessing: dict, parent: int | None
) -> dict[str, Any]:
    """What makes a stored file self-describing, whatever its format: enough to rebuild the
    model (architecture, labels, preprocessing) and to know where it came from."""
    return {
        "architecture": architecture,
        "labels": labels,
        "preprocessing": preprocessing,
        "model": name,
        "parent": "" if parent is None else str(parent),
        "graft_version": __version__,
    }


def store_model_files(
    storage: Storage,
    prefix: str,
    model: nn.Module,
    metadata: dict[str, Any],
    preprocessing: Preprocessing,
    exports: Sequence[str],
    tmp: Path,
    stored: list[StoredObject],
    images: torch.Tensor,
) -> tuple[dict[str, StoredObject], dict[str, str]]:
    """Store a version's files under ``prefix``, each carrying ``metadata`` and each run in
    its own runtime on ``images`` against the model before it is stored
    (:func:`engine.artifacts.write_artifacts`): the safetensors file, then each format
    of ``exports``. A format that cannot be written or does not reproduce the model is left
    out (the version has the others); running out of memory or disk is raised. Each object
    is added to ``stored`` as soon as it exists, for the caller to delete should the version
    not be recorded. Returns the stored files by format, and why each format that was asked
    for is not offered."""
    files: dict[str, StoredObject] = {}

    def keep(fmt: str, path: Path) -> None:
        files[fmt] = storage.put_file(f"{prefix}/model{SUFFIXES[fmt]}", path)
        stored.append(files[fmt])
        path.unlink()  # a big model's copies need not all wait on the disk

    failed = write_artifacts(model, preprocessing, metadata, exports, tmp, images, keep)
    for fmt, why in failed.items():
        log.warning("%s: no %s file: %s", prefix, fmt, why)
    return files, failed


def add_version(session: Session, model: Model, **fields: Any) -> ModelVersion:
    """Append the next version of ``model``; promoted versions become ``latest_version``.

    The model row is locked (on databases that can) so concurrent jobs number their versions
    one after another; the unique (model, version) constraint backs this up everywhere.
    """
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    number = next_version_number(session, model.id)
    version_id = fields.pop("version_id", None) or new_id()
    version = ModelVersion(id=version_id, model_id=model.id, version=number, **fields)
    session.add(version)
    if version.status == VersionStatus.PROMOTED:
        model.latest_version = version.version
    session.flush()
    return version


def next_version_number(session: Session, model_id: str) -> int:
    """The number the model's next version gets (final only under ``add_version``'s lock)."""
    current = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    )
    return (current or 0) + 1
