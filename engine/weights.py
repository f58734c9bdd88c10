"""Read, check and write classifier weights; safetensors is the format Graft stores."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from engine.architectures import build_model
from engine.errors import WeightsError, first_line, resource_error
from engine.families import family, family_of
from engine.heads import Head, find_head
from engine.metadata import string_metadata

_SHOW = 5  # how many offending keys an error message lists


MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header describes tensors; 16 MiB is ~100k of them
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, loaded with ``weights_only=True``.

    Never unpickles arbitrary objects: a checkpoint that needs code, a TorchScript archive or a
    whole pickled module is refused with :class:`WeightsError`. Run it in a sandbox
    (:mod:`engine.intake`), not in a server process.
    """
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise WeightsError(
            "weights must be a .safetensors file or a state dict loadable with "
            f"torch.load(weights_only=True); refused: {first_line(exc, 10_000)}"
        ) from None
    return _as_state_dict(loaded)


def tensor_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header; no tensor data is read."""
    with path.open("rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
    if header_size > MAX_HEADER_BYTES:
        raise WeightsError(
            f"the safetensors header claims {header_size} bytes; at most "
            f"{MAX_HEADER_BYTES} are accepted"
        )
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                for k in f.keys()  # noqa: SIM118
            }
    except Exception as exc:  # the parser's own errors: bad header, offsets beyond the file
        # mmap fails with ENOMEM when memory is short: that is not the user's file's fault
        raise resource_error(exc) or WeightsError(f"unreadable safetensors file: {exc}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (Graft stores nothing else)."""
    tensor_layout(path)
    return safetensors.torch.load_file(str(path))


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


def _kind(dtype: str) -> str:
    return "float" if dtype in FLOAT_DTYPES else "integer" if dtype[0] in "IU" else dtype


def check_layout(model: nn.Module, layout: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """Raise :class:`WeightsError` naming the first missing, unexpected, misshapen or mistyped
    keys of a weights file against the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in layout]
    unexpected = [k for k in layout if k not in expected]
    misshapen = [
        f"{k}: expected {list(expected[k].shape)}, got {list(layout[k][1])}"
        for k in expected
        if k in layout and tuple(expected[k].shape) != layout[k][1]
    ]
    mistyped = [
        f"{k}: expected {'float' if v.is_floating_point() else 'integer'}, got {layout[k][0]}"
        for k, v in expected.items()
        if k in layout and _kind(layout[k][0]) != ("float" if v.is_floating_point() else "integer")
    ]
    problems = []
    for what, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape", misshapen),
        ("dtype", mistyped),
    ):
        if keys:
            more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
            problems.append(f"{what} keys: {keys[:_SHOW]}{more}")
    if problems:
        raise WeightsError("weights do not fit the architecture: " + "; ".join(problems))


def load_classifier(architecture: str, num_labels: int, path: Path) -> tuple[nn.Module, Head]:
    """Build ``architecture`` and load the safetensors file at ``path``, strictly, in eval mode.

    The file's header is checked against the model (names, shapes, dtypes) before any tensor
    is read; the label count is checked against the classifier layer's rows first, so a
    mismatch says both numbers instead of a shape error.
    """
    own = family(architecture.partition(":")[0])
    if own is not None:  # strict too, each by its own format (from_pretrained, Keras, ONNX)
        model = own.load(path, num_labels)
        return model, find_head(model)
    model = build_model(architecture, num_labels)
    head = find_head(model)
    layout = tensor_layout(path)
    rows = layout.get(head.weight_key)
    if rows is not None and len(rows[1]) == 2 and rows[1][0] != num_labels:
        raise WeightsError(
            f"{num_labels} labels were given but the classifier layer {head.path!r} "
            f"of the weights has {rows[1][0]} outputs"
        )
    check_layout(model, layout)
    model.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    return model.eval(), find_head(model)


def save_safetensors(path: Path, model: nn.Module, metadata: Mapping[str, object]) -> None:
    """Write the model's state dict with string metadata; non-strings are stored as JSON.
    A Hugging Face model is written as its own checkpoint, a Keras model as its variables,
    each with its config in the metadata."""
    own = family(family_of(model))
    if own is not None:
        own.save(path, model, metadata)
        return
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = string_metadata(metadata)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
