"""Read, check and write classifier weights; safetensors is the format Graft stores."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from worker.engine.architectures import build_model
from worker.engine.errors import WeightsError
from worker.engine.heads import Head, find_head

_SHOW = 5  # how many offending keys an error message lists


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``weights_only`` torch state dict.

    Never unpickles arbitrary objects: a checkpoint that needs code, a TorchScript archive or a
    whole pickled module is refused with :class:`WeightsError`.
    """
    if _is_safetensors(path):
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as exc:  # safetensors raises its own and OS errors
            raise WeightsError(f"unreadable safetensors file: {exc}") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            "weights must be a .safetensors file or a state dict loadable with "
            f"torch.load(weights_only=True); refused: {first_line}"
        ) from None
    return _as_state_dict(loaded)


def _as_state_dict(loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError("the weights file holds no state dict (a mapping of name to tensor)")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(loaded):
        bad = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)][:_SHOW]
        raise WeightsError(f"the state dict holds values that are not tensors: {bad}")
    return {str(k).removeprefix("module."): v for k, v in tensors.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`WeightsError` naming the first missing, unexpected or misshapen keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        f"{k}: expected {list(expected[k].shape)}, got {list(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and expected[k].shape != state_dict[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", misshapen)):
        if keys:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            problems.append(f"{what} keys: {keys[:_SHOW]}{more}")
    if problems:
        raise WeightsError("weights do not fit the architecture: " + "; ".join(problems))


def load_classifier(
    architecture: str, num_labels: int, state_dict: Mapping[str, torch.Tensor]
) -> tuple[nn.Module, Head]:
    """Build ``architecture`` and load ``state_dict`` into it, strictly, in eval mode.

    The label count is checked against the classifier layer's rows first, so a mismatch says
    both numbers instead of a shape error.
    """
    model = build_model(architecture, num_labels)
    head = find_head(model)
    rows = state_dict.get(head.weight_key)
    if rows is not None and rows.ndim == 2 and rows.shape[0] != num_labels:
        raise WeightsError(
            f"{num_labels} labels were given but the classifier layer {head.path!r} "
            f"of the weights has {rows.shape[0]} outputs"
        )
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), find_head(model)


def save_safetensors(path: Path, model: nn.Module, metadata: Mapping[str, object]) -> None:
    """Write the model's state dict with string metadata; non-strings are stored as JSON."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def read_metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
