"""Hugging Face ``transformers`` image classifiers (``hf:<class name>``, e.g.
``hf:ViTForImageClassification``): a folder with ``config.json`` and ``model.safetensors``, as
``save_pretrained`` writes it and ``from_pretrained`` reads it.

Graft stores such a model like any other, as one safetensors file: the folder's own
``model.safetensors`` (the checkpoint's tensor names, which ``transformers`` maps to its modules
on loading, whatever its version), with the folder's ``config.json`` added to the file's
metadata (``hf_config``). Loading and saving go through ``from_pretrained`` and
``save_pretrained``. The engine runs the model through :class:`HFClassifier`, which returns
logits. A version goes back out as the same folder layout, its ``id2label``/``label2id``
updated.

``transformers`` is an optional dependency (``pip install graft[hf]``): without it, an
``hf:`` architecture is refused with a message saying so.
"""

from __future__ import annotations

import difflib
import json
import math
import tempfile
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from engine.errors import (
    Mismatch,
    UnknownArchitecture,
    UnsupportedHead,
    WeightsError,
    named,
)
from engine.metadata import string_metadata
from engine.preprocessing import Preprocessing

FAMILY = "hf"
CONFIG_KEY = "hf_config"  # safetensors metadata: the folder's config.json
MISSING = "Hugging Face models need the transformers package: pip install 'graft[hf]'"


class MissingExtra(WeightsError):
    """An optional dependency is not installed."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtra(MISSING) from None
    return transformers


@cache
def image_classifiers() -> frozenset[str]:
    """The class names ``AutoModelForImageClassification`` builds."""
    from transformers.models.auto.modeling_auto import (  # noqa: PLC0415
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names,
    )

    return frozenset(v if isinstance(v, str) else v[0] for v in names.values())


def check_name(name: str) -> None:
    _transformers()
    if name not in image_classifiers():
        matches = difflib.get_close_matches(name, image_classifiers(), n=5, cutoff=0.6)
        raise UnknownArchitecture(f"{FAMILY}:{name}", [f"{FAMILY}:{m}" for m in matches])


class HFClassifier(nn.Module):
    """A ``transformers`` image classifier that takes pixels and returns logits."""

    graft_family = FAMILY

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def get_classifier(self) -> nn.Module:
        classifier = getattr(self.model, "classifier", None)
        if not isinstance(classifier, nn.Module):
            heads = [n for n, m in self.model.named_children() if isinstance(m, nn.Linear)]
            raise UnsupportedHead(
                f"{type(self.model).__name__} has no single classifier layer (its output "
                f"layers: {', '.join(heads) or 'none found'}): Graft grows Hugging Face models "
                "whose logits come from one `classifier` layer"
            )
        return classifier

    @property
    def config(self) -> Any:
        return self.model.config


def build(config: dict, labels: list[str] | int) -> HFClassifier:
    """A randomly initialised classifier from a ``config.json`` dict, with one output per label
    (``labels``: the labels, or just how many)."""
    transformers = _transformers()
    names = [str(i) for i in range(labels)] if isinstance(labels, int) else list(labels)
    config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    model_type = config.pop("model_type", None)
    if not model_type:
        raise WeightsError("config.json has no model_type")
    try:
        cfg = transformers.AutoConfig.for_model(
            model_type,
            **config,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        model = transformers.AutoModelForImageClassification.from_config(cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"config.json does not describe an image classifier: {exc}") from None
    return HFClassifier(model).eval()


def architecture_of(config: dict) -> str:
    """``hf:<class name>`` of a ``config.json`` dict (its first ``architectures`` entry)."""
    classes = config.get("architectures") or []
    if not classes:
        raise WeightsError("config.json names no architecture (its 'architectures' list is empty)")
    return f"{FAMILY}:{classes[0]}"


def load(path: Path, num_labels: int) -> HFClassifier:
    """The model of a Graft safetensors file (its metadata holds the config), loaded strictly:
    a tensor missing, unexpected or of the wrong shape is an error, not a random init."""
    transformers = _transformers()
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(CONFIG_KEY)
    if raw is None:
        raise WeightsError("weights of a Hugging Face model must carry their config.json")
    config = json.loads(raw)
    declared = len(config.get("id2label") or {}) or config.get("num_labels")
    if declared and declared != num_labels:
        raise WeightsError(
            f"{num_labels} labels were given but the model's config.json has {declared}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        (Path(tmp) / "model.safetensors").symlink_to(path.resolve())
        return _from_pretrained(transformers, Path(tmp))


def _from_pretrained(transformers: Any, folder: Path) -> HFClassifier:
    try:
        model, info = transformers.AutoModelForImageClassification.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except RecursionError:
        raise WeightsError("the model's config is nested too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 (a garbage checkpoint raises whatever it raises)
        if isinstance(exc, MemoryError):
            raise
        raise WeightsError(f"transformers cannot load the model: {named(exc)}") from None
    problems = [
        f"{what}: {sorted(map(str, keys))[:5]}"
        for what, keys in (
            ("missing", info.get("missing_keys")),
            ("unexpected", info.get("unexpected_keys")),
            ("mismatched", info.get("mismatched_keys")),
        )
        if keys
    ]
    if problems:
        raise WeightsError("weights do not fit the config.json: " + "; ".join(problems))
    return HFClassifier(model).eval()


def read_folder(
    folder: Path, num_labels: int | None = None
) -> tuple[HFClassifier, Preprocessing | None]:
    """The model of a folder as ``save_pretrained`` writes it (the folder may sit one level
    down, as in an archive of it), and the preprocessing of its ``preprocessor_config.json``
    (None without one). Only safetensors weights are read: no pickle is ever loaded. The
    config is checked before anything is built: its label count against ``num_labels``, and
    the parameters it describes (counted on the ``meta`` device) against the tensors of
    ``model.safetensors``, so a config cannot make Graft allocate what the file does not
    hold."""
    transformers = _transformers()
    folder = _root(folder)
    config = _read_json(folder / "config.json", "config.json")
    if not isinstance(config, dict):
        raise WeightsError("the model folder's config.json is not a JSON object")
    architecture_of(config)
    if not (folder / "model.safetensors").is_file():
        raise WeightsError(
            "the model folder has no model.safetensors (pickled pytorch_model.bin files and "
            "sharded checkpoints are not accepted: save_pretrained(safe_serialization=True) "
            "with a max_shard_size that fits the model in one file)"
        )
    declared = _declared_labels(config)
    if num_labels is not None and declared is not None and declared != num_labels:
        raise Mismatch(
            f"{num_labels} labels were given but the model's config.json has {declared}",
            "labels",
        )
    _check_size(transformers, config, folder / "model.safetensors")
    return _from_pretrained(transformers, folder), _preprocessing(folder)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise WeightsError(f"{name} is nested too deeply to read") from None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"the model folder's {name} is unreadable: {exc}") from None


def _declared_labels(config: dict) -> int | None:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    count = config.get("num_labels")
    if count is None:
        return None
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise WeightsError(f"config.json's num_labels is not a positive integer: {count!r}")
    return count


def _check_size(transformers: Any, config: dict, weights: Path) -> None:
    """The parameters ``config`` describes, counted without allocating them, must be the
    tensors the checkpoint holds (give or take buffers)."""
    from engine.weights import tensor_layout  # noqa: PLC0415

    held = sum(math.prod(shape) for _, shape in tensor_layout(weights).values())
    labels = ("id2label", "label2id", "num_labels")  # checked already; rows are few
    settings = {k: v for k, v in config.items() if k not in labels}
    model_type = settings.pop("model_type", None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **settings)
        with torch.device("meta"):
            model = transformers.AutoModelForImageClassification.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 (a config from outside raises what it raises)
        if isinstance(exc, MemoryError):
            raise
        raise WeightsError(
            f"config.json does not describe an image classifier: {named(exc)}"
        ) from None
    described = sum(p.numel() for p in model.parameters())
    if described > held * 1.01 + 1024:
        raise WeightsError(
            f"config.json describes {described:,} parameters but model.safetensors holds "
            f"{held:,} values: the config does not belong to these weights"
        )


def run_folder(folder: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits of the model in a ``save_pretrained`` folder, loaded as its users load it."""
    model = _from_pretrained(_transformers(), folder)
    with torch.inference_mode():
        return model(images.float().cpu())


def save(path: Path, model: HFClassifier, metadata: Mapping[str, object]) -> None:
    """A Graft safetensors file: the checkpoint ``save_pretrained`` writes, with ``metadata``
    and the config (labels included, from ``metadata['labels']`` when given)."""
    labels = metadata.get("labels")
    if isinstance(labels, str):
        labels = json.loads(labels)
    if labels is not None:
        _set_labels(model, list(labels))
    with tempfile.TemporaryDirectory() as tmp:
        model.model.save_pretrained(tmp, safe_serialization=True)
        written = Path(tmp) / "model.safetensors"
        with safetensors.safe_open(str(written), framework="pt") as f:
            own = dict(f.metadata() or {})
        tensors = safetensors.torch.load_file(str(written))
    meta = string_metadata(metadata)
    meta[CONFIG_KEY] = json.dumps(model.config.to_dict())
    safetensors.torch.save_file(tensors, str(path), metadata={**own, **meta})


def _set_labels(model: HFClassifier, labels: list[str]) -> None:
    config = model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


def _root(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.glob("*/config.json"))
    if len(found) != 1:
        raise WeightsError("the archive holds no config.json (or several): expected one model")
    return found[0]


def _preprocessing(folder: Path) -> Preprocessing | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
        size = cfg.get("crop_size") or cfg.get("size") or {}
        if isinstance(size, int):
            height = width = size
        else:
            height = size.get("height") or size.get("shortest_edge")
            width = size.get("width") or size.get("shortest_edge")
        return Preprocessing(
            input_size=(3, int(height), int(width)),
            mean=tuple(float(v) for v in cfg["image_mean"]),
            std=tuple(float(v) for v in cfg["image_std"]),
            interpolation={2: "bilinear", 3: "bicubic", 0: "nearest"}.get(
                cfg.get("resample"), "bilinear"
            ),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"preprocessor_config.json is not usable: {exc}") from None


def write_folder(
    model: HFClassifier, labels: list[str], preprocessing: Preprocessing, folder: Path
) -> None:
    """The version as ``from_pretrained`` loads it: ``config.json`` with its labels,
    ``model.safetensors``, and ``preprocessor_config.json`` saying how images are prepared."""
    _set_labels(model, labels)
    model.model.save_pretrained(str(folder), safe_serialization=True)
    _, height, width = preprocessing.input_size
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_resize": True,
                "size": {"height": height, "width": width},
                "resample": {"bilinear": 2, "bicubic": 3, "nearest": 0}.get(
                    preprocessing.interpolation, 2
                ),
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(preprocessing.mean),
                "image_std": list(preprocessing.std),
            },
            indent=2,
        )
    )


def export(
    fmt: str,
    model: nn.Module,
    prep: Preprocessing,
    path: Path,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """The version as a zip of the folder ``from_pretrained`` loads (``config.json`` with its
    labels, ``model.safetensors``, ``preprocessor_config.json``), plus ``graft.json`` (the
    version's description, as in the other formats)."""
    if not isinstance(model, HFClassifier):
        raise WeightsError("only Hugging Face models are written as a transformers folder")
    labels = (metadata or {}).get("labels")
    if isinstance(labels, str):
        labels = json.loads(labels)
    labels = (
        list(labels)
        if labels is not None
        else [model.config.id2label[i] for i in range(model.config.num_labels)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(model, labels, prep, folder)
        (folder / "graft.json").write_text(json.dumps(dict(metadata or {}), indent=2, default=str))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, file.name)


# The family protocol (engine.families.Family)
NAME = FAMILY
TITLE = "Hugging Face"
OWN_FORMATS = ("hf",)
NOT_OFFERED: tuple[str, ...] = ()


def read_upload(
    upload: Path, architecture: str, num_labels: int, declared: bool
) -> tuple[HFClassifier, Preprocessing | None]:
    model, prep = read_folder(upload, num_labels)
    named = architecture_of(model.config.to_dict())
    if named != architecture:
        raise Mismatch(f"the model's config.json is a {named}, not {architecture}", "architecture")
    return model, prep if declared else None


def run(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as zf:
        zf.extractall(tmp)  # a zip Graft wrote: three known names
        return run_folder(Path(tmp), images)
