"""A job's config has one type from the request to the engine: validated once, stored with
its version, read back typed by the worker, and turned into the engine's dataclasses in one
place; older rows are upgraded where they are read."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from core.job_config import (
    CONFIG_VERSION,
    EvaluationConfig,
    JobConfig,
    ResolvedJobConfig,
    read_job_config,
)
from core.settings import Settings
from engine.calibrate import Calibration
from engine.data import Augmentation
from engine.expand import ExpansionConfig
from engine.gate import GateSettings
from worker.spec import expansion_config


def test_a_job_that_says_nothing_runs_with_the_engines_defaults():
    resolved = ResolvedJobConfig.resolve(JobConfig(), has_old_images=False, gate={})
    assert expansion_config(resolved, Settings()) == ExpansionConfig()
    with_old = ResolvedJobConfig.resolve(JobConfig(), has_old_images=True, gate={})
    engine = expansion_config(with_old, Settings())
    assert engine == replace(
        ExpansionConfig(), training=replace(ExpansionConfig().training, old_rows_frozen=False)
    )


def test_what_a_request_says_reaches_the_engine_typed():
    asked = JobConfig.model_validate(
        {
            "freeze": "last_block",
            "old_rows": "frozen",
            "epochs": 7,
            "folds": 3,
            "solver": "sgd",
            "calibration": "bias_correction",
            "max_old_accuracy_drop": 0.02,
            "augmentation": {"views": 4, "hflip": True, "scale": [0.9, 1.1]},
            "export": ["onnx"],
        }
    )
    stored = ResolvedJobConfig.resolve(asked, has_old_images=True, gate={"margin": 0.05}).stored()
    assert stored["config_version"] == CONFIG_VERSION
    assert stored["old_rows"] == "frozen"  # what was asked wins over the default
    assert stored["gate"] == {**vars(GateSettings()), "margin": 0.05}

    read = read_job_config(stored, min_images=20)
    assert read.stored() == stored  # the round trip through the database's JSON is exact
    engine = expansion_config(read, Settings())
    assert (engine.freeze, engine.folds, engine.solver) == ("last_block", 3, "sgd")
    assert engine.training.epochs == 7 and engine.training.old_rows_frozen
    assert engine.calibration == Calibration(method="bias_correction", max_old_drop=0.02)
    assert engine.augmentation == Augmentation(views=4, hflip=True, scale=(0.9, 1.1))
    assert read.export == ["onnx"] and read.gate.margin == 0.05


def test_a_row_stored_before_config_versions_reads_back_with_todays_defaults():
    legacy = {
        "init": "imprint",
        "epochs": 5,
        "learning_rate": 0.01,
        "batch_size": 32,
        "weight_decay": 0.0001,
        "seed": 1,
        "validation_split": 0.2,
        "old_rows": "trainable",
        "augmentation": {"views": 2},
        "min_old_accuracy_retention": 0.9,
    }
    read = read_job_config(legacy, min_images=12)
    assert read.config_version == CONFIG_VERSION
    assert read.gate == GateSettings(min_retention=0.9, min_images=12)
    assert (read.freeze, read.folds, read.solver, read.calibration) == (
        "head",
        5,
        "refit",
        "auto",
    )
    assert read.old_rows == "trainable" and read.augmentation.views == 2
    assert read_job_config({"init": "imprint"}, min_images=20).old_rows == "frozen"


def test_a_stored_config_that_does_not_fit_the_type_is_refused_not_guessed():
    good = ResolvedJobConfig.resolve(JobConfig(), has_old_images=True, gate={}).stored()
    with pytest.raises(ValidationError):
        read_job_config({**good, "epochs": -1}, min_images=20)
    with pytest.raises(ValidationError):
        read_job_config({**good, "unknown_setting": 1}, min_images=20)
    with pytest.raises(ValidationError):
        EvaluationConfig.model_validate({"versions": []})
    with pytest.raises(ValidationError):
        EvaluationConfig.model_validate({"versions": [2**31]})
    assert EvaluationConfig.model_validate({"versions": [1, 3]}).versions == [1, 3]
