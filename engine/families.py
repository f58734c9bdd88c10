"""The families whose models carry their own config: Hugging Face (``hf:``), Keras (``keras:``)
and ONNX (``onnx:``). Each is a module with ``load(path, num_labels)`` and ``save(path, model,
metadata)`` for Graft's safetensors file, and ``read_file``/``preprocessing_of`` or their like
for uploads; each is imported only when used (their packages are optional extras)."""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

MODULES = {
    "hf": "engine.hf",
    "keras": "engine.keras_family",
    "onnx": "engine.onnx_family",
}


def family_of(model: nn.Module) -> str | None:
    """``hf``, ``keras`` or ``onnx`` for a model of those families; None for timm/torchvision."""
    return getattr(model, "graft_family", None)


def module_for(family: str | None) -> ModuleType | None:
    """The family's module (imported now), or None for timm and torchvision."""
    name = MODULES.get(family or "")
    return importlib.import_module(name) if name else None
