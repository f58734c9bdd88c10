"""The gate's settings: the engine's defaults, a model's own (``PUT /v1/models/{name}/gate``)
and a job's overrides, resolved once into the job's config.

The rule itself is ``engine.gate``; this module only says which numbers it runs with.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from app.inputs import Input
from core.errors import Invalid
from core.settings import Settings
from engine.gate import GateSettings

DEFAULTS = GateSettings()


class GateConfig(Input):
    """Every field optional: what is left out comes from the model's settings, else the
    defaults. The rule: bench/gate.py and the README's "The gate" say what each one does."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"min_retention": 0.99, "margin": 0.02}]},
    )

    min_retention: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the share of old-class accuracy a version should keep "
        f"(default {DEFAULTS.min_retention}); a version whose whole 95 % interval is above it "
        "is promoted with strong evidence",
    )
    margin: float | None = Field(
        None,
        ge=0,
        le=1,
        description="non-inferiority margin (default "
        f"{DEFAULTS.margin}): a version is promoted when its interval rules out a retention "
        "below min_retention - margin, held when it cannot tell",
    )
    min_images: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="old-label images needed to measure retention at all (default: the "
        "server's GRAFT_MIN_RETENTION_IMAGES); with fewer the version is unverified",
    )
    label_max_drop: float | None = Field(
        None,
        gt=0,
        le=1,
        description="a drop of one old label's recall that counts as a collapse when the "
        f"evidence, Holm-adjusted across labels, shows it (default {DEFAULTS.label_max_drop})",
    )
    new_label_min_recall: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="each new label's recall must beat this, and chance, with evidence "
        f"(default {DEFAULTS.new_label_min_recall})",
    )
    alpha: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description=f"family-wise error of the per-label checks (default {DEFAULTS.alpha})",
    )

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def defaults(settings: Settings) -> dict[str, Any]:
    return asdict(GateSettings(min_images=settings.min_retention_images))


def resolve(settings: Settings, model_gate: dict | None, job_gate: GateConfig) -> dict[str, Any]:
    """Every setting the job's gate runs with: defaults, then the model's, then the job's."""
    return defaults(settings) | (model_gate or {}) | job_gate.given()


def parse_gate(text: str | None, field: str = "gate") -> dict[str, Any]:
    """A model's gate settings from a form field (JSON), as stored: only what was given."""
    if not text:
        return {}
    try:
        return GateConfig.model_validate(json.loads(text)).given()
    except (ValueError, ValidationError) as exc:
        raise Invalid(
            f"gate must be a JSON object of gate settings: {_first(exc)}", field
        ) from None


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        return f"{where}: {error['msg']}" if where else error["msg"]
    return str(exc).splitlines()[0]
