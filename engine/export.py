"""Export a classifier for serving without Graft, each file carrying its own description.

- ONNX: ``[N,C,H,W]`` float in, ``[N,classes]`` logits out, a dynamic batch dimension; the
  description in the model's ``metadata_props`` (strings; lists and dicts as JSON, as in the
  safetensors header).
- TorchScript: the eval-mode model traced in float32 on the CPU; the description as the JSON
  file ``graft.json`` among the archive's extra files (``torch.jit.load(path,
  _extra_files={"graft.json": ""})`` fills it in).

Each exporter checks what it wrote (the ONNX checker; the TorchScript file is loaded back and
run on another batch size against the model itself) and raises ``ExportFailed`` rather than
leave a file that would not serve the model. Some architectures cannot be exported to one
format or the other; callers decide whether that loses the format or fails.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from engine.errors import ExportFailed
from engine.families import family, family_of
from engine.metadata import string_metadata
from engine.preprocessing import Preprocessing

OPSET = 18
TORCHSCRIPT_DESCRIPTION = "graft.json"  # the extra file of a TorchScript archive

# torch's exporters keep process-wide state (the ONNX exporter's globals, the tracer's): an
# API serving several registrations at once exports one model at a time.
_EXPORTING = threading.Lock()


def export_onnx(
    model: nn.Module, prep: Preprocessing, path: Path, metadata: Mapping[str, object] | None = None
) -> None:
    """Write a single-file ONNX graph with a dynamic batch dimension and ``metadata`` in its
    ``metadata_props``."""
    model = model.float().eval().cpu()
    example = torch.randn(2, *prep.input_size)
    with _EXPORTING, warnings.catch_warnings():
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
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, string_metadata(metadata or {}))
    try:
        onnx.checker.check_model(graph)
    except onnx.checker.ValidationError as exc:
        raise ExportFailed(f"the exported ONNX graph is invalid: {exc}") from exc
    onnx.save(graph, str(path))


def export_torchscript(
    model: nn.Module, prep: Preprocessing, path: Path, metadata: Mapping[str, object] | None = None
) -> None:
    """Write the model traced to TorchScript, with ``metadata`` as the JSON extra file
    ``graft.json``. The file is loaded back and must give the model's logits for a batch of
    another size than the one traced (a trace that fixed the batch size is refused)."""
    model = model.float().eval().cpu()
    example = torch.randn(2, *prep.input_size)
    extra = {TORCHSCRIPT_DESCRIPTION: json.dumps(dict(metadata or {}))}
    with _EXPORTING, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, example, check_trace=False)  # checked below, once
        torch.jit.save(traced, str(path), _extra_files=extra)
        check = torch.randn(3, *prep.input_size)
        try:
            got = torch.jit.load(str(path), map_location="cpu")(check)
        except Exception as exc:
            raise ExportFailed(f"the traced model does not run on a batch of 3: {exc}") from exc
        want = model(check)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise ExportFailed("the traced model does not give one logits tensor per image")
    scale = max(1.0, want.abs().max().item())
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
        raise ExportFailed(
            f"the traced model disagrees with the model (largest difference "
            f"{(got - want).abs().max().item():.3g}): its forward pass takes paths a trace "
            "cannot record (control flow or shapes that depend on the input)"
        )


Exporter = Callable[[nn.Module, Preprocessing, Path, Mapping[str, object] | None], None]


PORTABLE = ("onnx", "torchscript")  # formats any architecture may be exported to
PORTABLE_EXPORTERS: dict[str, Exporter] = {"onnx": export_onnx, "torchscript": export_torchscript}


def exporter(model: nn.Module, fmt: str) -> Exporter:
    """What writes ``model`` in ``fmt``: its family's own writer for the family's formats (a
    Hugging Face folder, a ``.keras`` file, an ONNX model's own graph), else torch's."""
    own = family(family_of(model))
    if own is not None and fmt in own.OWN_FORMATS:
        return lambda model, prep, path, metadata=None: own.export(fmt, model, prep, path, metadata)
    if fmt not in PORTABLE_EXPORTERS:
        raise ExportFailed(f"only {fmt} models are written as {fmt} files")
    return PORTABLE_EXPORTERS[fmt]


def offered_formats(model: nn.Module, exports: Sequence[str]) -> tuple[str, ...]:
    """The formats a version of ``model`` is written in: of ``exports``, those its family can
    have, then its family's own (see :func:`native_formats`)."""
    own = family(family_of(model))
    never = own.NOT_OFFERED if own is not None else ()
    return (*(f for f in exports if f not in never), *native_formats(model))


def native_formats(model: nn.Module) -> tuple[str, ...]:
    """The formats of the model's own family besides safetensors: a Hugging Face model's
    ``from_pretrained`` folder, a Keras model's ``.keras`` file."""
    own = family(family_of(model))
    return tuple(f for f in own.OWN_FORMATS if f not in PORTABLE) if own is not None else ()
