"""Models made the way each community makes them, through the whole path a model takes:
registered in the sandbox (opened, run, version 1 written in every format and each format run
in its own runtime), then grown by two labels as a job grows them (old logits kept) and written
again, every format of the grown model run in its own runtime too.

Keras: Sequential, Functional, augmentation layers inside the model, a head without bias.
ONNX: ``torch.onnx.export`` (TorchScript exporter, and dynamo both as one file and with its
weights in ``.onnx.data``, sent as a zip), a graph fixed to a batch of one, and a graph with
an unused label branch as skl2onnx writes. Hugging Face: classes beyond those of
tests/engine/test_heads.py. Hugging Face's LeViT and SwiftFormer, which Graft refuses, are in
tests/app/test_model_intake.py.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from app.registration import EXPORTS
from core.versions import artifact_metadata
from engine import intake, sandbox
from engine.artifacts import PROBE_IMAGES, write_artifacts
from engine.heads import expand_head
from engine.preprocessing import Preprocessing
from engine.probe import probe_images
from engine.weights import load_classifier
from tests.support.model_files import linear_graph

LABELS = ["a", "b", "c"]
NOT_OFFERED = {"onnx": {"torchscript"}}  # an ONNX graph runs in onnxruntime, not in torch.jit
SMALL = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}
TINY = {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}


# ---------------------------------------------------------------- Keras


def keras_file(folder: Path, kind: str) -> Path:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    layers = keras.layers
    if kind == "sequential":
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                layers.Conv2D(4, 3, activation="relu"),
                layers.GlobalAveragePooling2D(),
                layers.Dense(3, activation="softmax"),
            ]
        )
    else:
        inputs = keras.Input((32, 32, 3))
        x = inputs
        if kind == "augmenting":  # as keras.io teaches: augmentation inside the model
            x = layers.RandomFlip("horizontal")(x)
            x = layers.RandomRotation(0.1)(x)
            x = layers.RandomZoom(0.1)(x)
            x = layers.Rescaling(1 / 255)(x)
        x = layers.Conv2D(4, 3, activation="relu")(x)
        x = layers.GlobalAveragePooling2D()(x)
        bias = kind != "no bias"
        outputs = layers.Dense(3, use_bias=bias, activation=None if bias else "softmax")(x)
        model = keras.Model(inputs, outputs)
    path = folder / "model.keras"
    model.save(path)
    return path


# ---------------------------------------------------------------- ONNX


def small_torch_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def torch_onnx(folder: Path, how: str) -> Path:
    model, x = small_torch_model(), (torch.zeros(2, 3, 32, 32),)
    path = folder / "model.onnx"
    if how == "torchscript":
        torch.onnx.export(model, x, path, dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    elif how == "batch of one":
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), path, dynamo=False)
    else:
        pytest.importorskip("onnxscript")
        batch = {0: torch.export.Dim("batch")}
        external = how == "dynamo, data file"
        torch.onnx.export(model, x, path, dynamo=True, dynamic_shapes=(batch,),
                          external_data=external)  # fmt: skip
        if external:  # as Graft asks for it: the graph and its data file in one zip
            assert (folder / "model.onnx.data").is_file()
            archive = folder / "model.zip"
            with zipfile.ZipFile(archive, "w") as zf:
                zf.write(path, "export/model.onnx")
                zf.write(folder / "model.onnx.data", "export/model.onnx.data")
            return archive
    return path


def label_branch_onnx(folder: Path) -> Path:
    """skl2onnx's shape: the probabilities also feed an ArgMax label branch."""
    from onnx import TensorProto, helper

    branch = [
        helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1),
        helper.make_node("Cast", ["index"], ["label"], to=TensorProto.FLOAT),
    ]
    path = folder / "model.onnx"
    path.write_bytes(linear_graph(extra_nodes=branch).SerializeToString())
    return path


# ---------------------------------------------------------------- Hugging Face


def hf_folder(folder: Path, name: str) -> Path:
    transformers = pytest.importorskip("transformers")
    configs = {
        "RegNetForImageClassification": lambda: transformers.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8
        ),
        "EfficientNetForImageClassification": lambda: transformers.EfficientNetConfig(
            image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128
        ),
        "MobileNetV2ForImageClassification": lambda: transformers.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25
        ),
        "ConvNextV2ForImageClassification": lambda: transformers.ConvNextV2Config(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]
        ),
    }
    config = configs[name]()
    config.num_labels, config.architectures = len(LABELS), [name]
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    model.save_pretrained(folder / "hf", safe_serialization=True)
    return folder / "hf"


CASES: list[tuple[str, str, dict, Callable[[Path], Path]]] = [
    ("keras Sequential", "keras:s", SMALL, lambda d: keras_file(d, "sequential")),
    ("keras Functional", "keras:f", SMALL, lambda d: keras_file(d, "functional")),
    ("keras augmentation layers", "keras:a", SMALL, lambda d: keras_file(d, "augmenting")),
    ("keras use_bias=False", "keras:b", SMALL, lambda d: keras_file(d, "no bias")),
    ("onnx torchscript exporter", "onnx:t", SMALL, lambda d: torch_onnx(d, "torchscript")),
    ("onnx dynamo one file", "onnx:d", SMALL, lambda d: torch_onnx(d, "dynamo, one file")),
    ("onnx dynamo data file", "onnx:e", SMALL, lambda d: torch_onnx(d, "dynamo, data file")),
    ("onnx batch of one", "onnx:1", SMALL, lambda d: torch_onnx(d, "batch of one")),
    ("onnx label branch", "onnx:l", TINY, label_branch_onnx),
    *(
        (f"hf {name}", f"hf:{name}", SMALL, lambda d, name=name: hf_folder(d, name))
        for name in (
            "RegNetForImageClassification",
            "EfficientNetForImageClassification",
            "MobileNetV2ForImageClassification",
            "ConvNextV2ForImageClassification",
        )
    ),
]


def unpacked(upload: Path, folder: Path) -> Path:
    """What the server hands the sandbox for a zip (its unpacked folder)."""
    if upload.suffix != ".zip":
        return upload
    with zipfile.ZipFile(upload) as zf:
        zf.extractall(folder / "unpacked")
    return folder / "unpacked"


@pytest.mark.parametrize(("case", "architecture", "prep", "make"), CASES, ids=[c[0] for c in CASES])
def test_each_exporters_model_registers_grows_and_runs_in_every_format(
    case, architecture, prep, make, tmp_path
):
    made = tmp_path / "made"
    made.mkdir()
    upload = unpacked(make(made), made)
    registered = tmp_path / "v1"
    registered.mkdir()
    metadata = artifact_metadata("m", architecture, LABELS, prep, None)
    answer = intake.check_model(
        registered,
        architecture=architecture,
        labels=LABELS,
        upload=upload,
        preprocessing=prep,
        exports=list(EXPORTS),
        metadata=metadata,
        limits=sandbox.Limits(),
    )
    absent = NOT_OFFERED.get(architecture.partition(":")[0], set())
    assert answer["failed"] == {}, answer["failed"]  # not tried, so not a failure either
    assert {"safetensors", *EXPORTS} - absent <= set(answer["files"])

    # a job's growth: version 1 loaded back as the worker loads it, two labels added
    model, head = load_classifier(architecture, 3, registered / answer["files"]["safetensors"])
    images = probe_images(Preprocessing.from_dict(prep), PROBE_IMAGES, seed=2)
    with torch.inference_mode():
        before = model(images)
    expand_head(model, head, new_rows=2)
    with torch.inference_mode():
        after = model(images)
    torch.testing.assert_close(after[:, :3], before, rtol=1e-4, atol=1e-5)  # float32 rounding

    grown = tmp_path / "v2"
    grown.mkdir()
    written: dict[str, Path] = {}
    labels = [*LABELS, "d", "e"]
    failed = write_artifacts(
        model,
        Preprocessing.from_dict(prep),
        artifact_metadata("m", architecture, labels, prep, 1),
        list(EXPORTS),
        grown,
        images,
        written.__setitem__,
    )
    assert failed == {}, failed
    assert set(answer["files"]) == set(written)  # the grown version offers what v1 did
