"""Models from other exporters and hostile model files, registered through the real app.

Each upload is opened, run and written out in a bounded process (engine.intake): what
Graft can grow registers and runs; what it cannot is a 422 naming the cause, before anything
is stored; nothing here is ever a 5xx, and nothing is left in the data folder after a refusal.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from devkit import digits as D
from tests.support.model_files import LABELS, RESNET, external_constant, hf_zip, linear_graph


def register(client, name: str, architecture: str, blob: bytes, filename: str, **fields):
    data = {
        "name": name,
        "architecture": architecture,
        "labels": json.dumps(fields.pop("labels", LABELS)),
    }
    data |= {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    return client.post("/v1/models", data=data, files={"weights": (filename, blob)})


def nothing_left(client, settings) -> None:
    """A refusal stores nothing: no model, no artifact, no temporary file."""
    assert client.get("/v1/models").json()["items"] == []
    leftovers = [p for p in (settings.data_dir / "artifacts").rglob("*") if p.is_file()]
    leftovers += [p for p in settings.tmp_dir.rglob("*") if p.is_file()]
    assert leftovers == []


def predict(client, name: str, images: list[bytes]):
    return client.post(
        f"/v1/models/{name}/versions/1/predict",
        files=[("image", (f"{i}.png", b)) for i, b in enumerate(images)],
    )


def pngs(n: int, size: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return [D.png_bytes(Image.fromarray(p)) for p in pixels]


# ---------------------------------------------------------------- ONNX


def test_an_onnx_graph_exported_for_a_batch_of_one_registers_and_predicts_many(client):
    graph = linear_graph(batch=1).SerializeToString()
    made = register(client, "one", "onnx:fixed", graph, "m.onnx")
    assert made.status_code == 201, made.text
    assert "onnx" in made.json()["formats"]
    answered = predict(client, "one", pngs(3))
    assert answered.status_code == 200, answered.text
    assert len(answered.json()["predictions"]) == 3


def test_a_dead_label_branch_is_dropped_and_the_stored_graph_runs(client, tmp_path):
    """skl2onnx-style: the probabilities also feed ArgMax -> a label lookup no output uses."""
    branch = [
        helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1),
        helper.make_node("Cast", ["index"], ["index_f"], to=TensorProto.FLOAT),
    ]
    graph = linear_graph(extra_nodes=branch).SerializeToString()
    made = register(client, "branchy", "onnx:branchy", graph, "m.onnx")
    assert made.status_code == 201, made.text
    stored = client.get("/v1/models/branchy/versions/1/artifact?format=onnx").content
    kept = onnx.load_from_string(stored)
    assert [n.op_type for n in kept.graph.node] == ["Flatten", "Gemm", "Softmax"]
    session = ort.InferenceSession(stored, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"images": np.zeros((2, 3, 8, 8), np.float32)})
    assert out.shape == (2, 3)


def test_external_data_comes_as_a_zip_and_a_lone_graph_says_how(client, settings, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(linear_graph(), str(path), save_as_external_data=True, size_threshold=0,
              all_tensors_to_one_file=True, location="m.onnx.data")  # fmt: skip
    alone = register(client, "ext", "onnx:ext", path.read_bytes(), "m.onnx")
    assert alone.status_code == 422
    assert "m.onnx.data" in alone.json()["detail"] and ".zip" in alone.json()["detail"]
    nothing_left(client, settings)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.write(path, "export/m.onnx")
        zf.write(tmp_path / "m.onnx.data", "export/m.onnx.data")
    made = register(client, "ext", "onnx:ext", buffer.getvalue(), "m.zip")
    assert made.status_code == 201, made.text
    assert predict(client, "ext", pngs(2)).status_code == 200


@pytest.mark.parametrize("location", ["/etc/hostname", "../../../../etc/hostname", "nothere"])
def test_external_data_outside_the_upload_is_refused(client, settings, location):
    """Even in a Constant node (not only initializers), and without saying what exists."""
    refused = register(client, "ext", "onnx:ext", external_constant(location), "m.onnx")
    assert refused.status_code == 422, refused.text
    assert "separate file" in refused.json()["detail"]
    nothing_left(client, settings)


def test_custom_operators_are_refused_by_name(client, settings):
    custom = [helper.make_node("Boom", ["logits"], ["boom"], domain="com.example.ops")]
    graph = linear_graph(extra_nodes=custom, opsets=(("", 18), ("com.example.ops", 1)))
    refused = register(client, "custom", "onnx:custom", graph.SerializeToString(), "m.onnx")
    assert refused.status_code == 422, refused.text
    assert "com.example.ops::Boom" in refused.json()["detail"]
    nothing_left(client, settings)


# ---------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def k():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras")


def test_a_keras_model_with_two_inputs_is_refused_at_registration(client, settings, k, tmp_path):
    image, side = k.Input((8, 8, 3), name="image"), k.Input((4,), name="side")
    x = k.layers.Concatenate()([k.layers.Flatten()(image), side])
    model = k.Model([image, side], k.layers.Dense(3)(x))
    model.save(tmp_path / "two.keras")
    refused = register(
        client, "two", "keras:two", (tmp_path / "two.keras").read_bytes(), "two.keras"
    )
    assert refused.status_code == 422, refused.text
    assert "2 inputs" in refused.json()["detail"] and "image" in refused.json()["detail"]
    nothing_left(client, settings)


def test_keras_augmentation_layers_stay_off_so_predictions_repeat(client, k, tmp_path):
    """As keras.io teaches: augmentation and rescaling inside the model, a logits head."""
    k.utils.set_random_seed(0)
    inputs = k.Input((8, 8, 3))
    x = k.layers.RandomRotation(0.3)(inputs)
    x = k.layers.RandomZoom(0.3)(x)
    x = k.layers.Rescaling(1 / 255)(x)
    x = k.layers.Conv2D(4, 3, activation="relu")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    model = k.Model(inputs, k.layers.Dense(3)(x))
    model.save(tmp_path / "aug.keras")
    made = register(client, "aug", "keras:aug", (tmp_path / "aug.keras").read_bytes(), "a.keras")
    assert made.status_code == 201, made.text
    image = pngs(1)
    first, second = (predict(client, "aug", image).json() for _ in range(2))
    assert first == second


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def folder_of(model) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_heads_graft_cannot_grow_are_refused_at_registration_with_the_reason(
    client, settings, transformers
):
    levit = transformers.LevitForImageClassification(
        transformers.LevitConfig(
            image_size=64,
            hidden_sizes=[16, 32, 48],
            num_attention_heads=[1, 2, 3],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            num_labels=3,
            architectures=["LevitForImageClassification"],
        )  # fmt: skip
    )
    swift = transformers.SwiftFormerForImageClassification(
        transformers.SwiftFormerConfig(
            depths=[1, 1, 1, 1],
            embed_dims=[8, 16, 24, 32],
            num_labels=3,
            architectures=["SwiftFormerForImageClassification"],
        )  # fmt: skip
    )
    for model, said in ((levit, "LevitClassificationLayer"), (swift, "head, dist_head")):
        name = type(model).__name__
        refused = register(client, "h", f"hf:{name}", folder_of(model), "m.zip")
        assert refused.status_code == 422, refused.text
        assert said in refused.json()["detail"], refused.json()["detail"]
    nothing_left(client, settings)


@pytest.mark.parametrize(
    ("case", "upload", "said"),
    [
        ("deep config", lambda: hf_zip("[" * 100_000 + "]" * 100_000), "nested too deeply"),
        ("garbage weights", lambda: hf_zip(RESNET, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
         "unreadable safetensors"),
        ("huge hidden size", lambda: hf_zip(RESNET | {"hidden_sizes": [10**9, 10**9]}),
         "parameters"),
        ("a million labels", lambda: hf_zip(RESNET | {"num_labels": 10**6}),
         "3 labels were given"),
        ("zip bomb", lambda: hf_zip(RESNET, b"\0" * (40 * 1024 * 1024)), "compression ratio"),
        ("not an archive", lambda: b"plain bytes", ".zip"),
    ],
)  # fmt: skip
def test_hostile_hugging_face_uploads_are_a_422_and_leave_nothing(
    client, settings, transformers, case, upload, said
):
    refused = register(client, "hostile", "hf:ResNetForImageClassification", upload(), "m.zip")
    assert refused.status_code == 422, refused.text
    assert said in refused.json()["detail"], refused.json()["detail"]
    nothing_left(client, settings)


# ---------------------------------------------------------------- limits


def test_a_model_that_outruns_its_limits_is_refused_and_the_server_carries_on(
    settings, base_weights
):
    from fastapi.testclient import TestClient

    from app.main import create_app

    for limits, said in (
        ({"model_check_timeout_s": 0.5}, "took longer than"),
        ({"model_check_memory_bytes": 1024**3}, "more memory than allowed"),
    ):
        with TestClient(create_app(settings.model_copy(update=limits))) as client:
            refused = register(
                client,
                "digits",
                "timm:resnet18",
                base_weights.read_bytes(),
                "d.safetensors",
                labels=[str(d) for d in range(9)],
            )
            assert refused.status_code == 422, refused.text
            assert said in refused.json()["detail"], refused.json()["detail"]
            nothing_left(client, settings)
            assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("architecture", "said"),
    [
        ("timm:resnet18", "torch.save"),
        ("keras:anything", "zip archive"),
        ("onnx:anything", "neither an ONNX model"),
    ],
)
def test_bytes_that_are_no_model_file_are_refused_before_any_sandbox(
    client, settings, architecture, said
):
    refused = register(client, "noise", architecture, b"\xff" * 64, "noise.bin")
    assert refused.status_code == 422, refused.text
    assert said in refused.json()["detail"]
    nothing_left(client, settings)
