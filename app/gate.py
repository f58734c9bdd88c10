"""The gate's settings: the engine's defaults, a model's own (``PUT /v1/models/{name}/gate``)
and a job's overrides, resolved once into the job's config.

The rule itself is ``engine.gate``; this module only says which numbers it runs with.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from core.errors import Invalid
from core.job_config import GateConfig
from core.settings import Settings
from engine.gate import GateSettings


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
