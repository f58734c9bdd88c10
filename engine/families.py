"""The families whose files carry their own model: Hugging Face (``hf:``), Keras (``keras:``)
and ONNX (``onnx:``), each one module implementing :class:`Family`. timm and torchvision
models are built by name (``engine.architectures``) and need none of this.

A family's module is imported only when used (their packages are optional extras). Adding a
family is one module that implements the protocol and one line in :data:`MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn

from engine.preprocessing import Preprocessing


class Family(Protocol):
    """What Graft does with a family: name it, read an upload, load and save Graft's own
    safetensors file of it, and write the files of its own format."""

    NAME: str  # the architecture's prefix: hf, keras, onnx
    TITLE: str  # in messages
    OWN_FORMATS: tuple[str, ...]  # formats only this family writes, besides safetensors
    NOT_OFFERED: tuple[str, ...]  # portable formats (engine.export.PORTABLE) it never has

    def check_name(self, name: str) -> None:
        """Raise ``UnknownArchitecture`` (or the family's missing package) for a bad name."""

    def read_upload(
        self, upload: Path, architecture: str, num_labels: int, declared: bool
    ) -> tuple[nn.Module, Preprocessing | None]:
        """The model of an uploaded file or folder, checked against ``architecture`` and
        ``num_labels`` (``Mismatch``), and, if ``declared``, the preprocessing its files
        declare (None where they say nothing)."""

    def load(self, path: Path, num_labels: int) -> nn.Module:
        """The model of Graft's safetensors file of it, strictly, in eval mode."""

    def save(self, path: Path, model: nn.Module, metadata: Mapping[str, object]) -> None:
        """Graft's safetensors file of the model, with ``metadata``."""

    def export(
        self,
        fmt: str,
        model: nn.Module,
        prep: Preprocessing,
        path: Path,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        """Write the model in ``fmt``, one of ``OWN_FORMATS``."""

    def run(self, fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
        """What a file Graft wrote in ``fmt`` (one of ``OWN_FORMATS``; for ONNX also torch's
        export of any model) outputs for ``images``, run in that format's own runtime, as
        its users run it."""


MODULES = {
    "hf": "engine.hf",
    "keras": "engine.keras_family",
    "onnx": "engine.onnx_family",
}


def family_of(model: nn.Module) -> str | None:
    """``hf``, ``keras`` or ``onnx`` for a model of those families; None for timm/torchvision."""
    return getattr(model, "graft_family", None)


def family(name: str | None) -> Family | None:
    """The family's module (imported now), or None for timm and torchvision."""
    module = MODULES.get(name or "")
    return cast(Family, importlib.import_module(module)) if module else None
