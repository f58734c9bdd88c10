"""Bodies of jobs and evaluations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from app.schemas.common import (
    NAME_PATTERN,
    VersionStatusName,
)
from core.inputs import Input, VersionNumber
from core.job_config import (  # noqa: F401  (the API's contract names them too)
    AugmentationConfig,
    ExportFormat,
    GateConfig,
    JobConfig,
)


class JobCreate(Input):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "digits",
                    "dataset_id": "01M8G41ZV3798EK5RW4W3Z1BS8",
                    "new_labels": ["9"],
                    "config": {"epochs": 30, "augmentation": {"views": 4, "rotation_degrees": 8}},
                    "notify_url": "https://ci.example.com/graft-hook",
                }
            ]
        },
    )

    model: str = Field(pattern=NAME_PATTERN)
    base_version: VersionNumber | None = None
    dataset_id: str = Field(min_length=1, max_length=64)
    new_labels: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = None
    config: JobConfig = JobConfig()
    notify_url: HttpUrl | None = Field(
        None, description="POSTed the job, signed (Graft-Signature), when it ends"
    )


class JobProgress(BaseModel):
    stage: str
    fraction: float
    epoch: int | None = None
    epochs: int | None = None
    message: str = ""


class JobResult(BaseModel):
    model: str
    version: int
    gate: VersionStatusName | None = Field(
        None, description="what the gate made of the version when the job stored it"
    )


class JobError(BaseModel):
    code: str
    message: str


class JobRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "01M8G41ZYBDX8JCQC4XS2JXW29",
                    "status": "running",
                    "model": "digits",
                    "base_version": 1,
                    "dataset_id": "01M8G41ZV3798EK5RW4W3Z1BS8",
                    "new_labels": ["9"],
                    "config": {"freeze": "head", "old_rows": "frozen", "epochs": 30},
                    "progress": {
                        "stage": "training",
                        "fraction": 0.4,
                        "epoch": 12,
                        "epochs": 30,
                        "message": "loss 0.1412",
                    },
                    "metrics": None,
                    "result": None,
                    "error": None,
                    "warnings": [],
                    "attempt": 1,
                    "notify_url": None,
                    "created_at": "2026-11-28T03:44:22Z",
                    "started_at": "2026-11-28T03:44:22Z",
                    "finished_at": None,
                }
            ]
        }
    )

    id: str
    kind: Literal["expand", "evaluate"] = Field(
        "expand",
        description="expand: a job that adds labels (a new version); evaluate: an evaluation "
        "(POST /v1/evaluations), whose figures are its metrics",
    )
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    base_version: int
    dataset_id: str
    new_labels: list[str]
    config: dict[str, Any]
    progress: JobProgress
    metrics: dict[str, Any] | None
    result: JobResult | None
    error: JobError | None
    warnings: list[str] = Field(
        default_factory=list, description="what the user should know, e.g. unmeasurable retention"
    )
    attempt: int
    notify_url: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EvaluationCreate(Input):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "digits", "versions": [1, 2], "dataset_id": "01M8G41ZV3798EK5"}]
        },
    )

    model: str = Field(pattern=NAME_PATTERN)
    versions: list[VersionNumber] = Field(
        min_length=1,
        max_length=8,
        description="the versions to score, each at most once; the first is the baseline: "
        "its labels are the old labels, and every pair of versions is compared",
    )
    dataset_id: str = Field(
        min_length=1,
        max_length=64,
        description="labelled images (ImageFolder): every version scores each image whose "
        "label it knows",
    )
    notify_url: HttpUrl | None = Field(
        None, description="POSTed the evaluation's job record, signed, when it ends"
    )


class EvaluationRead(BaseModel):
    """An evaluation: a job of kind ``evaluate`` (it is also ``GET /v1/jobs/{id}``)."""

    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    versions: list[int]
    dataset_id: str
    progress: JobProgress
    result: dict[str, Any] | None = Field(
        description="once succeeded: ``versions`` (per version: overall accuracy and macro F1, "
        "accuracy on the baseline's labels and on the others, per-label precision, recall and "
        "F1, each with n and a 95 % interval, the confusion matrix, the images it could not "
        "score) and ``comparisons`` (per pair, on the images both can score: the paired "
        "outcomes, the accuracy difference and its interval, the exact McNemar p-value and "
        "its Holm adjustment, and the images whose prediction changed)"
    )
    error: JobError | None
    warnings: list[str] = Field(default_factory=list)
    attempt: int
    notify_url: str | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
