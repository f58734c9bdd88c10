"""Bodies of models, versions, reference sets and predictions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import (
    DELETED_AT,
    VersionState,
)
from core.inputs import Input
from core.job_config import (  # noqa: F401  (the API's contract names them too)
    AugmentationConfig,
    ExportFormat,
    GateConfig,
    JobConfig,
)


class PreprocessingSpec(Input):
    model_config = ConfigDict(extra="forbid")

    input_size: Annotated[
        list[Annotated[int, Field(ge=1, le=8192)]], Field(min_length=3, max_length=3)
    ]
    mean: Annotated[list[float], Field(min_length=1, max_length=4)]
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=4)]
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bilinear"

    @model_validator(mode="after")
    def _channels_agree(self) -> PreprocessingSpec:
        channels = self.input_size[0]
        if channels not in (1, 3):
            raise ValueError("input_size[0] (channels) must be 1 or 3")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError("mean and std need one value per channel")
        return self


class VersionSummary(BaseModel):
    version: int
    parent_version: int | None
    status: VersionState
    num_classes: int
    reference_images: int = 0
    created_at: datetime
    deleted_at: datetime | None = Field(None, description=DELETED_AT)


class PromotionRead(BaseModel):
    version: int
    previous_version: int | None
    previous_status: str
    actor: str
    reason: str | None
    created_at: datetime


class ModelVersionRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits",
                    "version": 2,
                    "parent_version": 1,
                    "job_id": "01M8G41ZYBDX8JCQC4XS2JXW29",
                    "architecture": "timm:resnet18",
                    "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                    "num_classes": 10,
                    "preprocessing": {
                        "input_size": [3, 32, 32],
                        "mean": [0.5, 0.5, 0.5],
                        "std": [0.5, 0.5, 0.5],
                        "interpolation": "bilinear",
                    },
                    "status": "promoted",
                    "metrics": {
                        "old_classes": {
                            "accuracy_before": 0.9815,
                            "accuracy_after": 0.9815,
                            "retention": 1.0,
                            "n": 540,
                            "ci95": {"retention": [0.9925, 1.0074]},
                        },
                        "new_classes": {"accuracy": 0.8667, "n": 15},
                        "gate": {"decision": "promoted", "evidence": "strong", "n": 540},
                    },
                    "reference": {"0": 60, "1": 60, "9": 15},
                    "formats": ["safetensors", "onnx", "torchscript"],
                    "sha256": "b698bec7f71c34a146f582df99d3d755da190f0b310ac2b215411aa6a48b0ba3",
                    "size_bytes": 44776216,
                    "created_at": "2026-11-28T03:44:22Z",
                }
            ]
        }
    )

    name: str
    version: int
    parent_version: int | None
    job_id: str | None
    architecture: str
    labels: list[str]
    num_classes: int
    preprocessing: dict[str, Any]
    status: VersionState = Field(
        description="promoted: passed its gate, or promoted on purpose; held: measured, but "
        "its images cannot decide it (more would: see metrics.gate.next_steps); rejected: the "
        "evidence shows it lost too much old-class accuracy, collapsed an old label or did not "
        "learn a new one; unverified: retention could not be measured; deleted: its files are "
        "gone (DELETE), its record stays so that the lineage of "
        "versions made from it stays readable"
    )
    metrics: dict[str, Any] | None
    reference: dict[str, int] = Field(
        default_factory=dict, description="images per label kept as the reference set"
    )
    formats: list[str] = Field(
        description="the files this version can be downloaded as (artifact?format=...); "
        "empty once it is deleted"
    )
    sha256: str | None = Field(description="of the safetensors file; null once it is deleted")
    size_bytes: int | None = Field(description="of the safetensors file; null once deleted")
    created_at: datetime
    deleted_at: datetime | None = Field(None, description=DELETED_AT)


class ModelRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits",
                    "created_at": "2026-11-28T03:44:22Z",
                    "latest_version": 2,
                    "versions": [
                        {
                            "version": 1,
                            "parent_version": None,
                            "status": "promoted",
                            "num_classes": 9,
                            "reference_images": 540,
                            "created_at": "2026-11-28T03:44:22Z",
                        },
                        {
                            "version": 2,
                            "parent_version": 1,
                            "status": "promoted",
                            "num_classes": 10,
                            "reference_images": 555,
                            "created_at": "2026-11-28T03:44:22Z",
                        },
                    ],
                    "promotions": [],
                }
            ]
        }
    )

    name: str
    created_at: datetime
    latest_version: int | None = Field(
        description="the version jobs build on by default: the newest one its gate promoted, "
        "or the one promoted (or rolled back to) on purpose since"
    )
    versions: list[VersionSummary]
    promotions: list[PromotionRead] = Field(
        default_factory=list, description="promotions and roll-backs made on purpose, newest first"
    )
    gate: dict[str, Any] = Field(
        default_factory=dict,
        description="the gate settings this model's jobs run with: its own (PUT "
        "/v1/models/{name}/gate) over the defaults",
    )


class ReferenceAdd(Input):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"dataset_id": "01M8G41ZV3798EK5RW4W3Z1BS8"}]},
    )

    dataset_id: str = Field(min_length=1, max_length=64)


class ReferenceRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "digits",
                    "version": 1,
                    "reference": {"0": 100, "1": 100, "8": 60},
                    "added": {"8": 60},
                    "ignored_labels": ["9"],
                }
            ]
        }
    )

    name: str
    version: int
    reference: dict[str, int] = Field(description="images per label in the reference set now")
    added: dict[str, int] = Field(description="images per label this request added")
    ignored_labels: list[str] = Field(description="dataset folders that are not labels of it")


class PromoteRequest(Input):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "ok"}]})

    reason: str | None = Field(None, max_length=2000)


class Prediction(BaseModel):
    label: str
    score: float


class PredictionsRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"predictions": [[{"label": "9", "score": 0.91}, {"label": "4", "score": 0.05}]]}
            ]
        }
    )

    predictions: list[list[Prediction]]
