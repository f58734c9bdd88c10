"""Keras 3 classifiers (``keras:<model name>``), run by the engine on Keras' PyTorch backend.

A ``.keras`` file is opened with ``safe_mode`` (a ``Lambda`` layer's code or a custom object is
refused, never run) and without compiling. Its classifier is the last ``Dense`` layer, the one
that produces the model's output; everything before it is the backbone, a Keras model that is
also a ``torch.nn.Module`` on this backend. :class:`KerasClassifier` runs the backbone on
channels-last images and the ``Dense`` layer as a ``torch.nn.Linear`` (kernel transposed), so
the engine sees logits; the layer's activation (softmax, usually) is put back on the way out.

Graft stores the model like any other, as one safetensors file: every Keras variable under its
path, the model's JSON config and the classifier layer's name in the metadata. A version goes
back out as a ``.keras`` file that ``keras.saving.load_model`` opens and that predicts the new
labels. ``keras`` is an optional dependency (``pip install graft[keras]``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from engine.errors import EngineError, UnknownArchitecture, WeightsError, check_label_count
from engine.metadata import string_metadata
from engine.preprocessing import Preprocessing

TITLE = "Keras"  # in messages
FAMILY = "keras"
CONFIG_KEY = "keras_config"  # safetensors metadata: the model's JSON config
HEAD_KEY = "keras_head"  # ... and the name of its classifier layer
MISSING = "Keras models need the keras package: pip install 'graft[keras]'"


class MissingKeras(WeightsError):
    """The keras extra is not installed (or runs on another backend)."""


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise MissingKeras(MISSING) from None
    if keras.backend.backend() != "torch":
        raise MissingKeras(
            f"Keras runs on its {keras.backend.backend()!r} backend in this process; Graft needs "
            "KERAS_BACKEND=torch"
        )
    return keras


def require() -> None:
    """:class:`MissingKeras` unless keras is installed; imports nothing (a server that only
    names the family does not pay for importing Keras)."""
    if importlib.util.find_spec("keras") is None:
        raise MissingKeras(MISSING)


class KerasClassifier(nn.Module):
    """A Keras classifier as the engine runs it: channels-first images in, logits out."""

    graft_family = FAMILY

    def __init__(self, model: Any) -> None:
        super().__init__()
        dense = _classifier_layer(model)
        keras = _keras()
        self.backbone = keras.Model(model.inputs, dense.input)
        self.fc = nn.Linear(dense.kernel.shape[0], dense.kernel.shape[1], bias=dense.use_bias)
        with torch.no_grad():
            self.fc.weight.copy_(_tensor(dense.kernel).T)
            if dense.use_bias:
                self.fc.bias.copy_(_tensor(dense.bias))
        self.activation = keras.activations.serialize(dense.activation)
        self.head_name = dense.name
        self.channels_last = keras.config.image_data_format() == "channels_last"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        # training=False: augmentation and dropout layers inside the model stay off
        return self.fc(self.backbone(x, training=False))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def to_keras(self) -> Any:
        """The Keras model: the backbone, and a ``Dense`` layer with this classifier's rows
        and the original activation."""
        keras = _keras()
        dense = keras.layers.Dense(
            self.fc.out_features,
            activation=keras.activations.deserialize(self.activation),
            use_bias=self.fc.bias is not None,
            name=self.head_name,
        )
        outputs = dense(self.backbone.outputs[0])
        model = keras.Model(self.backbone.inputs, outputs, name=self.backbone.name)
        weights = [self.fc.weight.detach().T.cpu().numpy()]
        if self.fc.bias is not None:
            weights.append(self.fc.bias.detach().cpu().numpy())
        dense.set_weights(weights)
        return model


def _tensor(variable: Any) -> torch.Tensor:
    return torch.as_tensor(variable.numpy()).float()


def _classifier_layer(model: Any) -> Any:
    """The ``Dense`` layer whose output is the model's output (maybe through a final
    ``Activation``/``Softmax`` layer, which the ``Dense`` layer then takes over)."""
    keras = _keras()
    if len(model.inputs) != 1:
        names = [getattr(i, "name", "?") for i in model.inputs]
        raise EngineError(
            f"the Keras model takes {len(model.inputs)} inputs ({', '.join(names[:5])}); "
            "Graft grows models whose only input is the image"
        )
    if len(model.outputs) != 1:
        raise EngineError("the Keras model has several outputs; Graft expands models with one")
    layer = model.layers[-1]
    if isinstance(layer, keras.layers.Activation | keras.layers.Softmax):
        raise EngineError(
            f"the Keras model ends in a separate {type(layer).__name__} layer; give its "
            "activation to the last Dense layer (Dense(..., activation='softmax'))"
        )
    if not isinstance(layer, keras.layers.Dense):
        raise EngineError(
            f"the Keras model's last layer is a {type(layer).__name__}; Graft expands models "
            "whose output comes from a Dense layer"
        )
    return layer


# Keras builds a Sequential by adding its layers one at a time and rebuilding the model after
# each, in time that grows with the square of their number (800 layers: about a minute).
MAX_SEQUENTIAL_LAYERS = 400


def read_file(path: Path) -> KerasClassifier:
    """A ``.keras`` file, opened without running any code from it."""
    keras = _keras()
    _check_config(path)
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "model.keras"  # keras reads only files named so
        named.symlink_to(path.resolve())
        return _open(keras, named)


def _open(keras: Any, path: Path) -> KerasClassifier:
    try:
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except ValueError as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text or "custom" in text.lower():
            raise WeightsError(
                "the .keras file holds code (a Lambda layer or a custom object), which Graft "
                f"does not run: {text.splitlines()[0]}"
            ) from None
        raise WeightsError(f"keras cannot open the file: {text.splitlines()[0]}") from None
    except RecursionError:
        raise WeightsError("the .keras file's config is nested too deeply to read") from None
    except (OSError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise WeightsError(f"keras cannot open the file: {exc}") from None
    return KerasClassifier(model).eval()


def _check_config(path: Path) -> None:
    """Refuse, before Keras builds anything, a config too deep or a Sequential too long."""
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except RecursionError:
        raise WeightsError("the .keras file's config is nested too deeply to read") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"keras cannot open the file: {exc}") from None
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            inner = item.get("config")
            layers = inner.get("layers") if isinstance(inner, dict) else None
            long = isinstance(layers, list) and len(layers) > MAX_SEQUENTIAL_LAYERS
            if item.get("class_name") == "Sequential" and long:
                raise WeightsError(
                    f"the .keras file is a Sequential model of {len(layers):,} layers; Keras "
                    f"builds a Sequential of more than {MAX_SEQUENTIAL_LAYERS} layers too "
                    "slowly to check (its time grows with the square of the layer count): "
                    "save it as a Functional model, keras.Model(inputs, outputs)"
                )
        elif isinstance(item, list):
            stack.extend(item)


def run(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """What a ``.keras`` file outputs for ``images`` (``[N, C, H, W]``), loaded and called
    the way Keras users do (``load_model``, ``training=False``)."""
    keras = _keras()
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "model.keras"
        named.symlink_to(path.resolve())
        model = keras.saving.load_model(str(named), compile=False, safe_mode=True)
    last = keras.config.image_data_format() == "channels_last"
    x = images.permute(0, 2, 3, 1) if last else images
    with torch.no_grad():
        out = model(x.float().cpu(), training=False)
    return torch.as_tensor(keras.ops.convert_to_numpy(out))


def preprocessing_of(model: KerasClassifier) -> Preprocessing:
    """The input size the model declares, pixels scaled to [0, 1] (mean 0, std 1); a model
    that expects other values says so in its registration's ``preprocessing``."""
    shape = tuple(model.backbone.inputs[0].shape[1:])
    height, width, channels = shape if model.channels_last else (*shape[1:], shape[0])
    if None in (height, width, channels):
        raise WeightsError(
            "the Keras model's input has no fixed size: give one in the registration's "
            "preprocessing"
        )
    return Preprocessing(
        input_size=(int(channels), int(height), int(width)),
        mean=(0.0,) * int(channels),
        std=(1.0,) * int(channels),
    )


def save(path: Path, model: KerasClassifier, metadata: Mapping[str, object]) -> None:
    """A Graft safetensors file: every variable of the Keras model under its path, the model's
    JSON config and its classifier layer's name in the metadata."""
    rebuilt = model.to_keras()
    tensors = {v.path: torch.as_tensor(v.numpy()).contiguous() for v in rebuilt.weights}
    if len(tensors) != len(rebuilt.weights):
        raise WeightsError("the Keras model has variables with the same path")
    meta = string_metadata(metadata)
    meta[CONFIG_KEY] = rebuilt.to_json()
    meta[HEAD_KEY] = model.head_name
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def load(path: Path, num_labels: int) -> KerasClassifier:
    """The model of a Graft safetensors file, every variable set from it (strictly)."""
    keras = _keras()
    with safetensors.safe_open(str(path), framework="pt") as f:
        config = (f.metadata() or {}).get(CONFIG_KEY)
    if config is None:
        raise WeightsError("weights of a Keras model must carry its config")
    try:
        model = keras.models.model_from_json(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise WeightsError(f"the stored Keras config does not build: {exc}") from None
    tensors = safetensors.torch.load_file(str(path))
    paths = {v.path for v in model.weights}
    if paths != set(tensors):
        raise WeightsError(
            f"weights do not fit the Keras model: missing {sorted(paths - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - paths)[:5]}"
        )
    for variable in model.weights:
        value = tensors[variable.path]
        if tuple(value.shape) != tuple(variable.shape):
            raise WeightsError(f"{variable.path}: shape {tuple(value.shape)}, not {variable.shape}")
        variable.assign(value.numpy())
    classifier = KerasClassifier(model).eval()
    if classifier.fc.out_features != num_labels:
        raise WeightsError(
            f"{num_labels} labels were given but the Keras model has "
            f"{classifier.fc.out_features} outputs"
        )
    return classifier


def export(
    fmt: str,
    model: nn.Module,
    prep: Preprocessing,
    path: Path,
    metadata: Mapping[str, object] | None = None,
) -> None:
    """The version as a ``.keras`` file (``keras.saving.load_model`` opens it)."""
    if not isinstance(model, KerasClassifier):
        raise WeightsError("only Keras models are written as .keras files")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.keras"  # keras insists on the suffix
        model.to_keras().save(str(target))
        target.replace(path)


# The family protocol (engine.families.Family)
NAME = FAMILY
OWN_FORMATS = ("keras",)
NOT_OFFERED: tuple[str, ...] = ()


def check_name(name: str) -> None:
    """Any name: the model's config is in its file; Keras must be installed."""
    require()
    if not name:
        raise UnknownArchitecture(f"{FAMILY}:", [f"{FAMILY}:model"])


def read_upload(
    upload: Path, architecture: str, num_labels: int, declared: bool
) -> tuple[KerasClassifier, Preprocessing | None]:
    model = read_file(upload)
    check_label_count(model, num_labels, TITLE)
    return model, preprocessing_of(model) if declared else None
