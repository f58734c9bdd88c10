"""Request and response bodies of the HTTP API (API.md), separate from the ORM tables."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from core.inputs import Input, VersionNumber
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


VersionStatusName = Literal["promoted", "held", "rejected", "unverified"]  # what a gate decides
# A version's status: its gate's decision (or a promotion on purpose), or "deleted".
VersionState = Literal["promoted", "held", "rejected", "unverified", "deleted"]
DELETED_AT = "when the version was deleted (its status is then 'deleted'); null while it exists"


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


class RejectedFile(BaseModel):
    path: str
    reason: str


DatasetStatus = Literal["importing", "ready", "failed"]


class DatasetSource(BaseModel):
    kind: Literal["prefix", "manifest"]
    uri: str


class ImportProgress(BaseModel):
    fraction: float
    done: int = Field(description="objects handled so far")
    total: int | None = Field(description="objects to handle; null while they are listed")
    message: str = ""


class DatasetError(BaseModel):
    code: str
    message: str


class DatasetRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "01M8G41ZV3798EK5RW4W3Z1BS8",
                    "name": "digits",
                    "labels": {"0": 20, "8": 20, "9": 15},
                    "num_images": 55,
                    "rejected": [
                        {
                            "path": "9/notes.txt",
                            "reason": "not an image in an accepted format",
                        }
                    ],
                    "sha256": "009b61d7052244177a80e8e376ad0d6b9caad700a59928c1253face443097ac5",
                    "created_at": "2026-11-28T03:44:22Z",
                }
            ]
        }
    )

    id: str
    name: str | None
    labels: dict[str, int]
    num_images: int
    rejected: list[RejectedFile]
    sha256: str | None = Field(
        description="of the uploaded archive, or of the stored images of an imported dataset; "
        "null until it is ready"
    )
    created_at: datetime
    status: DatasetStatus = Field(
        "ready", description="importing while a dataset registered by reference is copied in"
    )
    source: DatasetSource | None = Field(None, description="where an import copies from")
    progress: ImportProgress | None = Field(None, description="of an import")
    error: DatasetError | None = Field(None, description="why an import failed")


class DatasetImport(Input):
    """A dataset registered by reference: images already in an allowed S3 bucket."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"source": "s3://photos/pets/", "name": "pets"}]},
    )

    source: str | None = Field(
        None,
        max_length=1100,
        description="s3://bucket/prefix/ in ImageFolder layout: each first-level folder under "
        "the prefix is a label",
    )
    manifest: str | None = Field(
        None,
        max_length=1100,
        description="s3://bucket/key of a CSV of `uri,label` lines (an optional `uri,label` "
        "header); every uri an s3:// object in an allowed bucket",
    )
    name: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _one_reference(self) -> DatasetImport:
        if (self.source is None) == (self.manifest is None):
            raise ValueError("give exactly one of source and manifest")
        return self


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
