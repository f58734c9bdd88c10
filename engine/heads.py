"""Find a classifier's output layer and grow it by new output units.

The guarantee that matters: after :func:`expand_head`, the first N rows (weights and bias) of
the classifier layer are bit-identical to the old ones, so old-class logits are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import UnsupportedHead

# Where torchvision (and most hand-written) classifiers keep their last layer.
_KNOWN_PATHS = ("fc", "classifier", "heads.head", "heads", "head", "head.fc", "last_linear")


@dataclass(frozen=True)
class Head:
    """The classifier layer of a model and its dotted path inside it."""

    path: str
    module: nn.Linear

    @property
    def num_classes(self) -> int:
        return self.module.out_features

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def weight_key(self) -> str:
        return f"{self.path}.weight"


def _last_linear(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Sequential):
        linears = [m for m in module if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1]
    return module


def _candidates(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, tuple):
            raise UnsupportedHead(
                "the model has several classifier heads (e.g. a distillation head); "
                "Graft can expand models with one classifier layer"
            )
        found.append(classifier)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg.get("classifier"), str):
        found.append(_get(model, cfg["classifier"]))
    found.extend(_get(model, path) for path in _KNOWN_PATHS)
    return [_last_linear(m) for m in found if m is not None]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_head(model: nn.Module) -> Head:
    """Locate the layer that produces the logits: timm's ``get_classifier()``, the timm
    ``pretrained_cfg['classifier']`` path, or torchvision's ``fc`` / ``classifier[-1]`` /
    ``heads.head`` / ``head``."""
    paths = {id(m): name for name, m in model.named_modules()}
    for candidate in _candidates(model):
        if isinstance(candidate, nn.Linear) and id(candidate) in paths:
            return Head(paths[id(candidate)], candidate)
    kinds = {type(m).__name__ for m in _candidates(model)}
    detail = f" (found {', '.join(sorted(kinds))})" if kinds else ""
    raise UnsupportedHead(
        f"no linear classifier layer found{detail}; Graft expands models whose last layer "
        "is a torch.nn.Linear"
    )


def expand_head(model: nn.Module, head: Head, new_rows: int) -> Head:
    """Replace ``head`` in ``model`` by a layer with ``new_rows`` more outputs.

    Old rows are copied bit-exactly; new rows start at zero (callers imprint them).
    """
    if new_rows < 1:
        raise ValueError("new_rows must be at least 1")
    old = head.module
    grown = nn.Linear(
        old.in_features,
        old.out_features + new_rows,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: old.out_features].copy_(old.weight)
        if old.bias is not None:
            grown.bias.zero_()
            grown.bias[: old.out_features].copy_(old.bias)
    grown.requires_grad_(old.weight.requires_grad)
    model.set_submodule(head.path, grown)
    if hasattr(model, "num_classes"):
        model.num_classes = grown.out_features
    return Head(head.path, grown)
