"""A child for bench/registration.py: import what the intake imports, answer, exit."""

import json

import onnx  # noqa: F401
import onnxruntime  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401

import worker.engine.artifacts  # noqa: F401
import worker.engine.intake  # noqa: F401
import worker.engine.probe  # noqa: F401
from worker.engine.sandbox import ANSWER

with open(ANSWER, "w") as f:
    json.dump({"started": True}, f)
