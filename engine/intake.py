"""Where a user's model file lands: opened, run and written out in a bounded process.

``check_model`` (in the server) writes a request into a scratch folder and runs this module
there under :mod:`engine.sandbox`'s limits. The child opens the upload the way its
family is opened (a pickle through ``torch.load(weights_only=True)``, a ``.keras`` file in
safe mode, an ONNX graph with its operators and external data checked, a Hugging Face folder
with its config checked before anything is built), runs it (:mod:`engine.probe`),
writes version 1's files and runs each in its own runtime
(:mod:`engine.artifacts`). It answers with the files it wrote, the formats it could
not offer and why, the preprocessing, and a summary of the model. The server never parses or
runs the upload's bytes itself.

``python -m engine.intake REQUEST``: ``REQUEST`` is a JSON file in the working folder.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine import sandbox
from engine.architectures import default_preprocessing
from engine.errors import EngineError, WeightsError, named, resource_error
from engine.families import family
from engine.preprocessing import Preprocessing

REQUEST = "request.json"
WHAT = "checking the model"


def check_model(
    folder: Path,
    *,
    architecture: str,
    labels: list[str],
    upload: Path,
    preprocessing: dict[str, Any] | None,
    exports: list[str],
    metadata: dict[str, Any],
    limits: sandbox.Limits,
) -> dict[str, Any]:
    """Open, run and write out the model at ``upload`` in a bounded process working in
    ``folder`` (which the caller removes). Returns ``{"files": {format: file name in
    folder}, "failed": {format: why}, "preprocessing": ..., "model": ...}``;
    :class:`sandbox.Refused` (``field`` says which request field) when the model is refused,
    :class:`sandbox.OverLimit` when it costs more than ``limits``."""
    request = {
        "architecture": architecture,
        "labels": labels,
        "upload": str(upload.resolve()),
        "preprocessing": preprocessing,
        "exports": exports,
        "metadata": metadata,
    }
    (folder / REQUEST).write_text(json.dumps(request))
    return sandbox.run(__name__, folder, [REQUEST], limits, WHAT)


def main(argv: list[str]) -> int:
    folder = Path.cwd()
    try:
        answer = _admit(json.loads((folder / argv[0]).read_text()), folder)
    except EngineError as exc:
        if resource_error(exc) is not None and not isinstance(exc, WeightsError):
            raise
        answer = {"error": str(exc), "field": getattr(exc, "field", "weights")}
    except RecursionError:
        answer = {"error": "the model's files are nested too deeply to read"}
    except Exception as exc:  # noqa: BLE001 (a foreign file raises what it raises)
        if resource_error(exc) is not None:
            raise  # the parent names the limit it went past
        answer = {"error": f"the model could not be opened or run: {named(exc)}"}
    (folder / sandbox.ANSWER).write_text(json.dumps(answer))
    return 2 if "error" in answer else 0


def _admit(request: dict[str, Any], folder: Path) -> dict[str, Any]:
    from engine.artifacts import PROBE_IMAGES, write_artifacts  # noqa: PLC0415
    from engine.probe import probe, probe_images  # noqa: PLC0415

    architecture, labels = request["architecture"], request["labels"]
    given = request.get("preprocessing")
    model, found = _open(architecture, len(labels), Path(request["upload"]), folder, not given)
    prep = Preprocessing.from_dict(given) if given else found or default_preprocessing(architecture)
    summary = probe(model, prep, len(labels))
    files: dict[str, str] = {}
    failed = write_artifacts(
        model,
        prep,
        {**request["metadata"], "preprocessing": prep.to_dict()},
        request["exports"],
        folder,
        probe_images(prep, PROBE_IMAGES, seed=1),
        lambda fmt, path: files.__setitem__(fmt, path.name),
    )
    return {
        "files": files,
        "failed": failed,
        "preprocessing": prep.to_dict(),
        "model": asdict(summary),
    }


def _open(
    architecture: str, num_labels: int, upload: Path, folder: Path, declared: bool
) -> tuple[Any, Any]:
    """The model of the upload, and (if ``declared``) the preprocessing its files declare
    (or None where they say nothing)."""
    from engine.weights import (  # noqa: PLC0415
        is_safetensors,
        load_classifier,
        load_pickled_state_dict,
    )

    own = family(architecture.partition(":")[0])
    if own is not None:  # hf:, keras:, onnx:
        return own.read_upload(upload, architecture, num_labels, declared)
    if not upload.is_file() or not is_safetensors(upload):
        import safetensors.torch  # noqa: PLC0415

        state = load_pickled_state_dict(upload)
        converted = folder / "upload.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, converted)
        upload = converted
    model, _head = load_classifier(architecture, num_labels, upload)
    return model, None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
