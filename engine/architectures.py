"""Build timm and torchvision classifiers by name, with random weights (no hub downloads).
Hugging Face classifiers (``hf:``) are named here too, but built from their ``config.json``
(engine/hf.py)."""

from __future__ import annotations

import difflib
from functools import cache

import timm
import torchvision.models
from torch import nn

from engine.errors import UnknownArchitecture, WeightsError
from engine.families import MODULES
from engine.families import family as family_module
from engine.preprocessing import Preprocessing

FAMILIES = ("timm", "torchvision", *MODULES)


@cache
def _known(family: str) -> frozenset[str]:
    if family == "timm":
        return frozenset(timm.list_models())
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _families_for(name: str) -> list[str]:
    """What a name given without a known family may have meant: the timm and torchvision
    models of that name (or close to it), a Hugging Face class, and the families whose files
    carry their own model (any name)."""
    found = [f"{f}:{name}" for f in ("timm", "torchvision") if name in _known(f)]
    if not found:
        found = [
            f"{f}:{m}"
            for f in ("timm", "torchvision")
            for m in difflib.get_close_matches(name, _known(f), n=3, cutoff=0.75)
        ]
    if name.endswith("ForImageClassification"):
        found.append(f"hf:{name}")
    return [*found, "keras:NAME (a .keras file)", "onnx:NAME (an .onnx file)"]


def parse_architecture(architecture: str) -> tuple[str, str]:
    """Split ``family:name`` and check the name exists, suggesting close matches if not.

    >>> parse_architecture("timm:resnet18")
    ('timm', 'resnet18')
    """
    family, sep, name = architecture.partition(":")
    if not sep or family not in FAMILIES:
        raise UnknownArchitecture(architecture, _families_for(name if sep else architecture))
    own = family_module(family)
    if own is not None:  # hf, keras, onnx: the family checks its own names
        own.check_name(name)
        return family, name
    if name not in _known(family):
        matches = difflib.get_close_matches(name, _known(family), n=5, cutoff=0.6)
        raise UnknownArchitecture(architecture, [f"{family}:{m}" for m in matches])
    return family, name


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A randomly initialised classifier with ``num_classes`` outputs, in eval mode."""
    family, name = parse_architecture(architecture)
    if family in MODULES:
        raise WeightsError(f"{architecture} is built from its own config, not by name")
    if family == "timm":
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model.eval()


def default_preprocessing(architecture: str) -> Preprocessing:
    """The architecture's own input config (timm ``pretrained_cfg``), else ImageNet values."""
    family, name = parse_architecture(architecture)
    if family == "timm":
        cfg = timm.get_pretrained_cfg(name)
        if cfg is not None:
            return Preprocessing(
                input_size=tuple(cfg.input_size),
                mean=tuple(cfg.mean),
                std=tuple(cfg.std),
                interpolation=cfg.interpolation or "bilinear",
            )
    return Preprocessing()
