"""A version's files, each proven in its own runtime before anyone may download it.

Every file Graft writes (its safetensors file, ONNX, TorchScript, a Keras ``.keras`` file, a
Hugging Face folder) is loaded back by the runtime a user would load it with (Graft's own
loader, onnxruntime, ``torch.jit``, ``keras.saving``, ``transformers``) and run on a few real
images; its outputs must be the engine's logits, or a softmax, log-softmax or sigmoid of them,
within :data:`TOLERANCE` of the largest logit. A format that fails is not offered, with the
reason; the safetensors file failing fails the whole step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import EngineError, ExportFailed, first_line, named, resource_error
from engine.export import exporter, offered_formats
from engine.families import family
from engine.formats import SAFETENSORS, SUFFIXES
from engine.preprocessing import Preprocessing
from engine.weights import load_classifier, save_safetensors

log = logging.getLogger(__name__)

TOLERANCE = 1e-3  # of the largest logit's magnitude (at least 1)
PROBE_IMAGES = 4  # how many images each file is run on


def reference_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The engine's logits of ``images``: the model in float32 on the CPU, in eval mode."""
    model.float().eval().cpu()
    with torch.inference_mode():
        return model(images.float().cpu()).float()


def write_artifacts(
    model: nn.Module,
    prep: Preprocessing,
    metadata: Mapping[str, object],
    exports: Sequence[str],
    folder: Path,
    images: torch.Tensor,
    on_written: Callable[[str, Path], None] = lambda fmt, path: None,
) -> dict[str, str]:
    """Write the safetensors file and each format of ``exports`` (and the model's family's
    own) into ``folder``, run each in its own runtime on ``images`` against the model's
    logits, and hand each good one to ``on_written``. Returns why each format that was asked
    for is not offered; a safetensors file that cannot be written or does not reproduce the
    model raises, as does running out of memory or disk."""
    architecture = str(metadata["architecture"])
    num_labels = len(metadata["labels"])  # type: ignore[arg-type]
    want = reference_logits(model, images)
    failed: dict[str, str] = {}
    for fmt in dict.fromkeys((SAFETENSORS, *offered_formats(model, exports))):
        path = folder / f"model{SUFFIXES[fmt]}"
        try:
            if fmt == SAFETENSORS:  # the framework of its tensors is safetensors' own key
                save_safetensors(path, model, {"format": "pt", **metadata})
            else:
                exporter(model, fmt)(model, prep, path, metadata)
            got = run_artifact(fmt, path, images, architecture, num_labels)
            check_outputs(fmt, got, want)
        except Exception as exc:
            if fmt == SAFETENSORS or resource_error(exc) is not None:
                raise
            failed[fmt] = _reason(exc)
            log.warning("no %s file: %s", fmt, failed[fmt])
            path.unlink(missing_ok=True)
            continue
        on_written(fmt, path)
    return failed


def _reason(exc: Exception) -> str:
    return first_line(exc) if isinstance(exc, EngineError) else named(exc)


def run_artifact(
    fmt: str, path: Path, images: torch.Tensor, architecture: str, num_labels: int
) -> torch.Tensor:
    """What the file at ``path`` outputs for ``images`` (``[N, C, H, W]``, normalised), run
    the way a user of that format runs it."""
    x = images.float().cpu()
    if fmt == SAFETENSORS:
        model, _ = load_classifier(architecture, num_labels, path)
        with torch.inference_mode():
            return model.float()(x)
    if fmt == "torchscript":
        with torch.inference_mode():
            return torch.jit.load(str(path), map_location="cpu")(x)
    own = family(fmt)  # onnx, keras, hf: the family whose format it is runs it
    if own is not None and fmt in own.OWN_FORMATS:
        return own.run(fmt, path, x)
    raise ExportFailed(f"no runtime known for {fmt}")


def check_outputs(fmt: str, got: object, want: torch.Tensor) -> None:
    """``got`` must be ``want`` (logits), or their softmax, log-softmax or sigmoid, within
    :data:`TOLERANCE` of the largest value, image by image."""
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ExportFailed(
            f"the {fmt} file gives {shape} for {len(want)} images, not {tuple(want.shape)}"
        )
    got = got.float()
    closest = None
    for name, form in (
        ("logits", want),
        ("softmax", want.softmax(1)),
        ("log-softmax", want.log_softmax(1)),
        ("sigmoid", want.sigmoid()),
    ):
        scale = max(1.0, form.abs().max().item())
        gap = (got - form).abs().max().item() / scale
        if gap <= TOLERANCE:
            return
        closest = min(closest or (gap, name), (gap, name))
    gap, name = closest  # type: ignore[misc]
    raise ExportFailed(
        f"the {fmt} file's outputs differ from the model's {name} by {gap:.3g} of the largest "
        f"value (tolerance {TOLERANCE:g})"
    )
