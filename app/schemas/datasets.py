"""Bodies of datasets: uploads, imports by reference and what they hold."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.inputs import Input
from core.job_config import (  # noqa: F401  (the API's contract names them too)
    AugmentationConfig,
    ExportFormat,
    GateConfig,
    JobConfig,
)


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
