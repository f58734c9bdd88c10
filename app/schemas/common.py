"""Shared pieces of the HTTP API's bodies (API.md): names, pages, problems, statuses."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from core.job_config import (  # noqa: F401  (the API's contract names them too)
    AugmentationConfig,
    ExportFormat,
    GateConfig,
    JobConfig,
)
from engine.formats import SUFFIXES

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
NAME_RULE = (
    "a name is 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or "
    "a digit (digits-v2, say)"
)
T = TypeVar("T")

# A version's files: safetensors always; the others exported from it where its architecture
# allows (``formats`` of a version lists what it has). The suffix names the stored object and
# the downloaded file.
# ``hf``: a Hugging Face model's own folder (zip), which only ``hf:`` versions have; ``keras``:
# a Keras model's ``.keras`` file, which only ``keras:`` versions have.
ArtifactFormat = Literal["safetensors", "onnx", "torchscript", "hf", "keras"]
ARTIFACT_SUFFIXES: dict[str, str] = SUFFIXES


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class Problem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "https://graft.dev/problems/invalid",
                    "title": "Unprocessable content",
                    "status": 422,
                    "detail": "new label '9' has 0 images in the dataset; at least 1 needed",
                    "errors": [
                        {
                            "field": "new_labels",
                            "message": "new label '9' has 0 images; at least 1 needed",
                        }
                    ],
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] = []


VersionStatusName = Literal["promoted", "held", "rejected", "unverified"]  # what a gate decides
# A version's status: its gate's decision (or a promotion on purpose), or "deleted".
VersionState = Literal["promoted", "held", "rejected", "unverified", "deleted"]
DELETED_AT = "when the version was deleted (its status is then 'deleted'); null while it exists"
