"""A job's configuration: one type from the request to the engine.

``JobConfig`` is what a request may say (every field optional, validated once at the API);
``ResolvedJobConfig`` is what the job runs with: the request with its defaults filled in, the
old rows' policy decided and the gate's settings resolved (defaults, the model's, the job's).
It is stored on the job (``Job.config``) with ``config_version`` and read back typed by the
worker (``read_job_config``); the engine's dataclasses are built from it in one place
(``worker.spec.expansion_config``). An evaluation's config is ``EvaluationConfig``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.inputs import INT4_MAX, Input
from engine.gate import GateSettings

CONFIG_VERSION = 1  # the stored shape; read_job_config upgrades older rows
DEFAULTS = GateSettings()
ExportFormat = Literal["onnx", "torchscript"]


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


class AugmentationConfig(Input):
    model_config = ConfigDict(extra="forbid")

    views: int = Field(
        1, ge=1, le=64, description="randomly augmented copies of each training image (1: none)"
    )
    hflip: bool = Field(False, description="flip views left-right at random")
    rotation_degrees: float = Field(
        0.0, ge=0, le=180, description="rotate views by up to this many degrees either way"
    )
    scale: tuple[float, float] = Field(
        (1.0, 1.0), description="[min, max] zoom of views; [1, 1]: none", examples=[[0.9, 1.1]]
    )
    noise_std: float = Field(
        0.0, ge=0, le=1, description="Gaussian noise added to views, in normalised units"
    )
    color_jitter: float = Field(
        0.0, ge=0, le=1, description="the most brightness, contrast and saturation may change"
    )

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 4:
            raise ValueError("scale must be [min, max] with 0 < min <= max <= 4")
        return v


class JobConfig(Input):
    """Every field optional; the resolved values are echoed back on the job."""

    model_config = ConfigDict(extra="forbid")

    freeze: Literal["head", "last_block", "none"] = Field(
        "head",
        description="what stays as it was: head, every layer but the classifier (fitted in "
        "closed form, measured by cross-fitting); last_block, all but the last block and the "
        "classifier; none, nothing (both fine-tune by epochs, timm and torchvision models only)",
    )
    old_rows: Literal["frozen", "trainable"] | None = Field(
        None,
        description="frozen: the old labels' rows of the classifier stay bit for bit (old "
        "logits unchanged); trainable: they are refitted, anchored to the original. Default: "
        "trainable when there are old-label images (the dataset's or a reference set), else "
        "frozen",
    )
    init: Literal["imprint", "random"] = Field(
        "imprint",
        description="how new rows start: imprint, from the mean features of their images; "
        "random, small random weights",
    )
    epochs: int = Field(
        30, ge=0, le=1000, description="passes over the images, for solver sgd and fine-tuning"
    )
    learning_rate: float = Field(
        1e-2,
        gt=0,
        le=10,
        description="the classifier layer's step size (sgd, fine-tuning); an unfrozen backbone "
        "learns at a hundredth of it",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="images per gradient step")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="L2 penalty of gradient steps")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="fixes splits, folds and augmentation: reruns agree"
    )
    validation_split: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="images held out to measure a fine-tuned backbone (freeze last_block or "
        "none); with freeze=head every image trains and is measured by cross-fitting",
    )
    folds: int = Field(5, ge=2, le=20, description="cross-fitting rounds (freeze=head)")
    solver: Literal["refit", "sgd"] = Field(
        "refit",
        description="refit: the whole classifier layer as one convex problem anchored to the "
        "original, when there are old-label images; sgd: the new rows (and slowly the old) by "
        "epochs of gradient steps",
    )
    augmentation: AugmentationConfig = Field(
        AugmentationConfig(),
        description="random views of the training images: each trains as `views` augmented copies",
        examples=[{"views": 4, "hflip": True, "rotation_degrees": 8}],
    )
    calibration: Literal["auto", "none", "weight_aligning", "bias_correction"] = Field(
        "auto",
        description="auto: lower a new label's logits only when held-out images show it takes "
        "too many old ones; bias_correction: alpha*z+beta chosen on held-out images; "
        "weight_aligning: new rows rescaled to the old rows' norm; none: as fitted",
    )
    max_old_accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="the most held-out old-class accuracy calibration may trade for the new "
        "labels (0.01: one point)",
    )
    gate: GateConfig = Field(
        GateConfig(),
        description="the gate's settings for this job, over the model's (PUT "
        "/v1/models/{name}/gate) and the defaults; the resolved ones are echoed back",
    )
    min_images_per_label: int = Field(
        1,
        ge=1,
        description="a job whose new label has fewer images than this in the dataset (after "
        "deduplication) is refused",
    )
    export: list[ExportFormat] = Field(
        ["onnx", "torchscript"],
        description="formats to write besides safetensors; one the architecture cannot be "
        "exported to is left out, with a warning on the job",
    )


class ResolvedJobConfig(JobConfig):
    """What a job runs with, as stored on the job and echoed back by the API."""

    config_version: Literal[1] = CONFIG_VERSION
    old_rows: Literal["frozen", "trainable"]  # decided at submission
    gate: GateSettings  # type: ignore[assignment]  (every setting resolved)

    @classmethod
    def resolve(
        cls, asked: JobConfig, has_old_images: bool, gate: dict[str, Any]
    ) -> ResolvedJobConfig:
        """Old rows adapt (slowly, anchored to the original) when there are old-label images
        to adapt on; with none they stay frozen. ``gate``: every setting, resolved."""
        fields = asked.model_dump()
        fields["old_rows"] = asked.old_rows or ("trainable" if has_old_images else "frozen")
        fields["gate"] = GateSettings(**gate)
        return cls.model_validate(fields)

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_job_config(stored: dict[str, Any], min_images: int) -> ResolvedJobConfig:
    """A job's stored config, typed. Rows written before ``config_version`` existed are
    upgraded here, in one place: a gate not yet resolved on the job gets the defaults (with
    ``min_images``, the server's GRAFT_MIN_RETENTION_IMAGES, and the minimum retention those
    jobs asked for); settings added since take their defaults."""
    fields = dict(stored)
    if "config_version" not in fields:
        gate = dict(fields.get("gate") or {})
        if "min_old_accuracy_retention" in fields:
            gate.setdefault("min_retention", fields.pop("min_old_accuracy_retention"))
        fields["gate"] = {"min_images": min_images} | gate
        fields["old_rows"] = fields.get("old_rows") or "frozen"
        fields["config_version"] = CONFIG_VERSION
    return ResolvedJobConfig.model_validate(fields)


class EvaluationConfig(BaseModel):
    """What an evaluation job scores: versions of one model, as stored on the job."""

    model_config = ConfigDict(extra="forbid")

    versions: list[int] = Field(min_length=1)

    @field_validator("versions")
    @classmethod
    def _fits(cls, v: list[int]) -> list[int]:
        if any(not 1 <= n <= INT4_MAX for n in v):
            raise ValueError("a version number is between 1 and 2^31 - 1")
        return v
