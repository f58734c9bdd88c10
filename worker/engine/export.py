"""Export an expanded classifier to ONNX (``[N,C,H,W]`` float in, ``[N,classes]`` logits out)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from worker.engine.architectures import Preprocessing

OPSET = 18


def export_onnx(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    """Write a single-file ONNX graph with a dynamic batch dimension."""
    model = model.float().eval().cpu()
    example = torch.randn(2, *prep.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
