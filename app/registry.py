"""Models and their versions: lookup, what the API shows of them, and promotion. Registering
a model is ``app.registration``; adding a version, ``core.versions``."""

from __future__ import annotations

import difflib
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.schemas import (
    ModelRead,
    ModelVersionRead,
    PromotionRead,
    VersionSummary,
)
from core.db import paginate
from core.errors import Conflict, NotFound
from core.models import Model, ModelVersion, Promotion, VersionStatus
from engine.formats import SAFETENSORS

log = logging.getLogger(__name__)


def find_model(session: Session, owner: str, name: str) -> Model | None:
    return session.scalar(select(Model).where(Model.owner == owner, Model.name == name))


def no_model(session: Session, owner: str, name: str) -> str:
    """Why ``name`` is not found: says which of the owner's models is named most like it."""
    names = session.scalars(select(Model.name).where(Model.owner == owner)).all()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"no model named {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


# What model_read shows, loaded in one query each rather than one per model.
WITH_VERSIONS = (selectinload(Model.versions), selectinload(Model.promotions))


def get_model(session: Session, owner: str, name: str) -> Model:
    model = session.scalar(
        select(Model).where(Model.owner == owner, Model.name == name).options(*WITH_VERSIONS)
    )
    if model is None:
        raise NotFound(no_model(session, owner, name))
    return model


def get_version(session: Session, owner: str, name: str, version: int) -> ModelVersion:
    model = get_model(session, owner, name)
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    )
    if row is None:
        raise NotFound(f"model {name!r} has no version {version}")
    return row


def list_models(
    session: Session, owner: str, limit: int, cursor: str | None
) -> tuple[list[Model], str | None]:
    query = select(Model).where(Model.owner == owner).options(*WITH_VERSIONS)
    return paginate(session, query, Model.name, limit, cursor)


def version_read(model: Model, version: ModelVersion) -> ModelVersionRead:
    # a deleted version has no files: it is read as what it was, with nothing to download
    main = version.artifacts.get(SAFETENSORS) or {"sha256": None, "size_bytes": None}
    return ModelVersionRead(
        name=model.name,
        version=version.version,
        parent_version=version.parent_version,
        job_id=version.job_id,
        architecture=version.architecture,
        labels=version.labels,
        num_classes=len(version.labels),
        preprocessing=version.preprocessing,
        status=version.status,
        metrics=version.metrics,
        reference=version.reference_counts,
        formats=list(version.artifacts),
        sha256=main["sha256"],
        size_bytes=main["size_bytes"],
        created_at=version.created_at,
        deleted_at=version.deleted_at,
    )


def model_read(model: Model, gate_defaults: dict[str, Any] | None = None) -> ModelRead:
    """``gate_defaults``: the server's gate defaults, shown under the model's own settings."""
    return ModelRead(
        gate=(gate_defaults or {}) | (model.gate or {}),
        name=model.name,
        created_at=model.created_at,
        latest_version=model.latest_version,
        versions=[
            VersionSummary(
                version=v.version,
                parent_version=v.parent_version,
                status=v.status,
                num_classes=len(v.labels),
                reference_images=sum(v.reference_counts.values()),
                created_at=v.created_at,
                deleted_at=v.deleted_at,
            )
            for v in model.versions
        ],
        promotions=[
            PromotionRead(
                version=p.version,
                previous_version=p.previous_version,
                previous_status=p.previous_status,
                actor=p.actor,
                reason=p.reason,
                created_at=p.created_at,
            )
            for p in model.promotions
        ],
    )


def promote_version(
    session: Session, owner: str, name: str, version: int, actor: str, reason: str | None
) -> Model:
    """Make ``version`` the model's latest on purpose, whatever its status: a promotion of a
    rejected or unverified version, or a roll-back to an older one. Recorded with ``actor``."""
    row = get_version(session, owner, name, version)
    model = row.model
    session.execute(select(Model.id).where(Model.id == model.id).with_for_update())
    session.refresh(model)
    session.refresh(row)
    if row.deleted_at is not None:  # deleted while this request waited for the lock
        raise Conflict(f"version {version} of {name!r} was deleted")
    session.add(
        Promotion(
            model_id=model.id,
            version=version,
            previous_version=model.latest_version,
            previous_status=row.status,
            actor=actor,
            reason=reason,
        )
    )
    row.status = VersionStatus.PROMOTED
    model.latest_version = version
    session.flush()
    session.refresh(model)
    return model
