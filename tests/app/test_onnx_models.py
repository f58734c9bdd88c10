"""ONNX classifiers over HTTP, from two exporters: torch.onnx.export (TorchScript-based, with a
final Softmax) of the digits resnet18, and Keras' model.export(format="onnx") of a small Keras
convnet (channels-last). Each is registered, taught "9" by a job and downloaded as an ONNX graph
whose old logits match the original's on real images to 1e-5."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from devkit import digits as D
from devkit.digits import ARCH, OLD, digits_archive
from engine.onnx_family import find_head
from engine.weights import load_classifier
from worker import pipeline

LABELS = [str(d) for d in OLD]


@pytest.fixture(scope="module")
def torch_onnx(tmp_path_factory, base_weights) -> bytes:
    model, _ = load_classifier(ARCH, 9, base_weights)
    with_softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    torch.onnx.export(
        with_softmax,
        torch.zeros(1, 3, 32, 32),
        str(path),
        input_names=["pixels"],
        output_names=["probabilities"],
        dynamic_axes={"pixels": {0: "n"}, "probabilities": {0: "n"}},
        dynamo=False,
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def keras_onnx(tmp_path_factory, digit_splits) -> bytes:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    base, _ = digit_splits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(9, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    keep = np.isin(base.targets, OLD)
    images = [im for im, k in zip(base.images, keep, strict=True) if k]
    x_train = (D.tensors(images).permute(0, 2, 3, 1)).numpy()  # as preprocessing will give
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x_train, base.targets[keep], epochs=8, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("keras-onnx") / "digits.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return path.read_bytes()


def logits(graph: bytes, x: np.ndarray) -> np.ndarray:
    """The classifier layer's output (before any Softmax) of an ONNX graph."""
    model = onnx.load_from_string(graph)
    head = find_head(model)
    model.graph.output.append(
        helper.make_tensor_value_info(head.logits, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([head.logits], {model.graph.input[0].name: x})[0]


@pytest.mark.parametrize("exporter", ["torch_onnx", "keras_onnx"])
def test_an_onnx_model_learns_a_label_and_its_old_logits_stay_put(
    request, exporter, client, settings, digit_splits
):
    original = request.getfixturevalue(exporter)
    name = exporter.replace("_", "-")
    prep = json.dumps(D.PREP.to_dict())
    created = client.post(
        "/v1/models",
        data={
            "name": name,
            "architecture": "onnx:digits",
            "labels": json.dumps(LABELS),
            "preprocessing": prep,
        },
        files={"weights": ("digits.onnx", original)},
    )
    assert created.status_code == 201, created.text
    assert "onnx" in created.json()["formats"]

    _, held = digit_splits
    archive = digits_archive(held, old_per_class=20, new_shots=25)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": name, "dataset_id": dataset["id"], "config": {"old_rows": "frozen"}}
    job = client.post("/v1/jobs", json=body).json()
    pipeline.run_job(job["id"], settings)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    # ONNX versions have no TorchScript format: it is not tried, so the job does not warn of it
    assert not [w for w in done["warnings"] if "torchscript" in w], done["warnings"]

    grown = client.get(f"/v1/models/{name}/versions/2/artifact?format=onnx").content
    meta = {p.key: p.value for p in onnx.load_from_string(grown).metadata_props}
    assert json.loads(meta["labels"]) == [*LABELS, "9"] and meta["parent"] == "1"

    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = np.array([d for d in range(10) for _ in held.of(d)[40:]])
    x = D.tensors(images).numpy()
    if exporter == "keras_onnx":
        x = x.transpose(0, 2, 3, 1).copy()
    before, after = logits(original, x), logits(grown, x)
    assert after.shape == (len(x), 10)
    # old_rows frozen: the old rows of the layer, and so the old logits, are untouched
    np.testing.assert_allclose(after[:, :9], before, rtol=0, atol=1e-5)
    assert (after.argmax(1)[targets == 9] == 9).mean() > 0.3  # chance: 0.1


def test_what_graft_cannot_grow_is_a_clear_422(client, base_weights, tmp_path):
    model, _ = load_classifier(ARCH, 9, base_weights)
    path = tmp_path / "conv-head.onnx"
    conv_head = torch.nn.Sequential(
        torch.nn.Conv2d(3, 9, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    torch.onnx.export(conv_head, torch.zeros(1, 3, 32, 32), str(path), dynamo=False)
    refused = client.post(
        "/v1/models",
        data={"name": "conv", "architecture": "onnx:conv", "labels": json.dumps(LABELS)},
        files={"weights": ("conv-head.onnx", path.read_bytes())},
    )
    assert refused.status_code == 422
    assert "Gemm" in refused.json()["detail"]
    garbage = client.post(
        "/v1/models",
        data={"name": "junk", "architecture": "onnx:junk", "labels": json.dumps(LABELS)},
        files={"weights": ("junk.onnx", io.BytesIO(b"not a graph"))},
    )
    assert garbage.status_code == 422 and "ONNX" in garbage.json()["detail"]
    assert client.get("/v1/models").json()["items"] == []
