"""A Keras 3 classifier over HTTP, the kind of model the seed article grows: a small convnet with
a Dense softmax head, trained here on digits 0-8 (Keras on its PyTorch backend), uploaded as a
.keras file, taught "9" by a job, and downloaded as a .keras file that keras.saving.load_model
opens and that predicts the new label."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from devkit import digits as D  # noqa: E402
from devkit.digits import OLD, digits_archive  # noqa: E402
from worker import pipeline  # noqa: E402

LABELS = [str(d) for d in OLD]


def pixels(images) -> np.ndarray:
    """Images as the Keras model takes them: [N, 32, 32, 3] in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory, digit_splits):
    base, _ = digit_splits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(9, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="digits")
    keep = np.isin(base.targets, OLD)
    x_train = pixels([im for im, k in zip(base.images, keep, strict=True) if k])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x_train, base.targets[keep], epochs=12, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "digits.keras"
    model.save(str(path))
    return path


def register(client, path, name="digits-keras", **fields):
    data = {"name": name, "architecture": "keras:digits", "labels": json.dumps(LABELS)} | fields
    with path.open("rb") as f:
        return client.post("/v1/models", data=data, files={"weights": (path.name, f)})


def test_register_teach_and_download_a_keras_model(
    client, settings, keras_file, digit_splits, tmp_path
):
    created = register(client, keras_file)
    assert created.status_code == 201, created.text
    v1 = created.json()
    assert v1["preprocessing"]["input_size"] == [3, 32, 32]
    assert {"keras", "onnx", "torchscript"} <= set(v1["formats"])

    _, held = digit_splits
    archive = digits_archive(held, old_per_class=20, new_shots=25)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits-keras", "dataset_id": dataset["id"], "config": {"old_rows": "frozen"}}
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    pipeline.run_job(job.json()["id"], settings)
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done["error"]

    download = client.get("/v1/models/digits-keras/versions/2/artifact?format=keras")
    assert download.status_code == 200
    path = tmp_path / "digits-keras-v2.keras"
    path.write_bytes(download.content)
    after = keras.saving.load_model(str(path))
    before = keras.saving.load_model(str(keras_file))

    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = np.array([d for d in range(10) for _ in held.of(d)[40:]])
    x = pixels(images)
    p_after = np.asarray(after.predict(x, verbose=0))
    p_before = np.asarray(before.predict(x, verbose=0))
    assert p_after.shape == (len(x), 10)
    np.testing.assert_allclose(p_after.sum(1), 1, atol=1e-4)  # still a softmax head
    old = targets < 9
    acc_before = (p_before.argmax(1)[old] == targets[old]).mean()
    acc_after = (p_after.argmax(1)[old] == targets[old]).mean()
    assert acc_before > 0.8 and acc_after >= acc_before - 0.03, (acc_before, acc_after)
    assert (p_after.argmax(1)[~old] == 9).mean() > 0.3  # chance: 0.1

    def onnx_logits(version: int) -> np.ndarray:
        url = f"/v1/models/digits-keras/versions/{version}/artifact?format=onnx"
        session = ort.InferenceSession(client.get(url).content, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x.transpose(0, 3, 1, 2).copy()})[0]  # NCHW

    logits = onnx_logits(2)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities, p_after, atol=1e-4)  # the .keras file's softmax
    # old rows frozen, backbone frozen: old logits are version 1's
    np.testing.assert_allclose(logits[:, :9], onnx_logits(1), rtol=0, atol=1e-5)

    predicted = client.post(
        "/v1/models/digits-keras/versions/2/predict",
        files=[("image", ("a.png", D.png_bytes(held.of(9)[50])))],
    )
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["predictions"][0][0]["label"] in {*LABELS, "9"}


def test_a_keras_file_with_code_in_it_is_refused_and_never_run(client, tmp_path):
    marker = tmp_path / "ran"
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)
    # code that leaves a mark when it runs (when the model is built, or loaded and called)
    leaves_a_mark = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]")
    x = keras.layers.Lambda(leaves_a_mark)(x)
    model = keras.Model(inputs, keras.layers.Dense(9, activation="softmax")(x))
    path = tmp_path / "lambda.keras"
    model.save(str(path))
    marker.unlink(missing_ok=True)
    refused = register(client, path, name="sneaky")
    assert refused.status_code == 422
    assert "code" in refused.json()["detail"] and "Lambda" in refused.json()["detail"]
    assert not marker.exists()
    assert client.get("/v1/models").json()["items"] == []


def test_a_keras_model_that_does_not_end_in_a_dense_layer_is_a_clear_422(client, tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(9)(x)
    model = keras.Model(inputs, keras.layers.Softmax()(x))
    path = tmp_path / "softmax-layer.keras"
    model.save(str(path))
    refused = register(client, path, name="separate-softmax")
    assert refused.status_code == 422
    assert "Dense(..., activation='softmax')" in refused.json()["detail"]


def test_a_keras_model_is_not_fine_tuned_and_the_job_says_why(
    client, settings, keras_file, digit_splits
):
    assert register(client, keras_file, name="no-tuning").status_code == 201
    archive = digits_archive(digit_splits[1], old_per_class=10, new_shots=8)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post(
        "/v1/jobs",
        json={
            "model": "no-tuning",
            "dataset_id": dataset["id"],
            "config": {"freeze": "last_block"},
        },
    ).json()
    pipeline.run_job(job["id"], settings)
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert "freeze='head'" in failed["error"]["message"]
    assert len(client.get("/v1/models/no-tuning").json()["versions"]) == 1
