"""A Hugging Face classifier over HTTP: a ResNet built from a config (no hub) and trained here on
digits 0-8, uploaded as a zip of its save_pretrained folder, taught "9" by a job, and downloaded
as the same folder layout (loaded by from_pretrained, offline) and as ONNX (onnxruntime)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from devkit import digits as D  # noqa: E402
from devkit.digits import OLD, digits_archive  # noqa: E402
from engine import hf  # noqa: E402
from worker import pipeline  # noqa: E402

ARCH = "hf:ResNetForImageClassification"
LABELS = [str(d) for d in OLD]


@pytest.fixture(scope="module")
def folder_zip(tmp_path_factory, digit_splits) -> bytes:
    """digits 0-8 as a transformers ResNet, zipped as save_pretrained writes it (in a folder)."""
    base, _ = digit_splits
    config = transformers.ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        architectures=["ResNetForImageClassification"],
    )
    model = D.train_base(base, OLD, model=hf.build(config.to_dict(), LABELS), epochs=10)
    folder = tmp_path_factory.mktemp("hf") / "digits-resnet"
    hf.write_folder(model, LABELS, D.PREP, folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for file in folder.iterdir():
            zf.write(file, f"digits-resnet/{file.name}")
    return buffer.getvalue()


def register(client, archive: bytes, **fields: str):
    data = {"name": "digits-hf", "architecture": ARCH, "labels": json.dumps(LABELS)} | fields
    return client.post("/v1/models", data=data, files={"weights": ("digits-resnet.zip", archive)})


def unzip_to(content: bytes, target):
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        zf.extractall(target)
    return target


def test_register_teach_and_download_a_hugging_face_model(
    client, settings, folder_zip, digit_splits, tmp_path
):
    created = register(client, folder_zip)
    assert created.status_code == 201, created.text
    v1 = created.json()
    assert v1["architecture"] == ARCH
    assert v1["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # from preprocessor_config.json
    assert "hf" in v1["formats"] and "onnx" in v1["formats"]

    _, held = digit_splits
    archive = digits_archive(held, old_per_class=20, new_shots=25)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits-hf", "dataset_id": dataset["id"], "config": {"old_rows": "frozen"}}
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    pipeline.run_job(job.json()["id"], settings)
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done["error"]

    download = client.get("/v1/models/digits-hf/versions/2/artifact?format=hf")
    assert download.status_code == 200
    assert "digits-hf-v2.hf.zip" in download.headers["content-disposition"]
    v2 = unzip_to(download.content, tmp_path / "v2")
    v1_folder = unzip_to(
        client.get("/v1/models/digits-hf/versions/1/artifact?format=hf").content, tmp_path / "v1"
    )
    after = transformers.AutoModelForImageClassification.from_pretrained(
        str(v2), local_files_only=True
    ).eval()
    before = transformers.AutoModelForImageClassification.from_pretrained(
        str(v1_folder), local_files_only=True
    ).eval()
    assert after.config.id2label == dict(enumerate([*LABELS, "9"]))
    assert json.loads((v2 / "graft.json").read_text())["parent"] in (1, "1")

    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = torch.tensor([d for d in range(10) for _ in held.of(d)[40:]])
    x = D.tensors(images)
    with torch.inference_mode():
        logits = after(pixel_values=x).logits
        old_logits = before(pixel_values=x).logits
    # the old rows were frozen and the backbone too: old logits are the original's
    np.testing.assert_allclose(logits[:, :9].numpy(), old_logits.numpy(), rtol=0, atol=1e-5)
    old = targets < 9
    acc_before = (old_logits.argmax(1)[old] == targets[old]).float().mean().item()
    acc_after = (logits.argmax(1)[old] == targets[old]).float().mean().item()
    assert acc_before > 0.75 and acc_after >= acc_before - 0.03, (acc_before, acc_after)
    assert (logits.argmax(1)[~old] == 9).float().mean().item() > 0.3  # chance: 0.1

    onnx_file = tmp_path / "v2.onnx"
    onnx_file.write_bytes(
        client.get("/v1/models/digits-hf/versions/2/artifact?format=onnx").content
    )
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": x[:8].numpy()})
    np.testing.assert_allclose(onnx_logits, logits[:8].numpy(), rtol=1e-3, atol=1e-4)

    predicted = client.post(
        "/v1/models/digits-hf/versions/2/predict",
        files=[("image", ("a.png", D.png_bytes(held.of(9)[50])))],
    )
    assert predicted.status_code == 200, predicted.text
    assert {p["label"] for p in predicted.json()["predictions"][0]} <= {*LABELS, "9"}


def test_what_does_not_fit_is_a_clear_422(client, folder_zip):
    wrong_arch = register(client, folder_zip, architecture="hf:ViTForImageClassification")
    assert wrong_arch.status_code == 422
    assert "ResNetForImageClassification" in wrong_arch.json()["detail"]
    too_few = register(client, folder_zip, labels=json.dumps(LABELS[:5]))
    assert too_few.status_code == 422 and "9" in too_few.json()["detail"]
    typo = register(client, folder_zip, architecture="hf:ResnetForImageClassification")
    assert typo.status_code == 422
    assert "hf:ResNetForImageClassification" in typo.json()["detail"]
    pickled = io.BytesIO()
    with zipfile.ZipFile(pickled, "w") as zf:
        zf.writestr(
            "m/config.json",
            zipfile.ZipFile(io.BytesIO(folder_zip)).read("digits-resnet/config.json"),
        )
        zf.writestr("m/pytorch_model.bin", b"not loaded, ever")
    refused = register(client, pickled.getvalue())
    assert refused.status_code == 422 and "model.safetensors" in refused.json()["detail"]
    assert client.get("/v1/models").json()["items"] == []


def test_the_python_client_registers_a_model_folder_as_it_is(client, folder_zip, tmp_path):
    from graft.client import Client

    folder = unzip_to(folder_zip, tmp_path / "unzipped") / "digits-resnet"
    graft = Client("http://testserver")
    graft.http = client  # the app in-process: the same requests a server would get
    version = graft.register_model("from-folder", ARCH, LABELS, folder)
    assert version.architecture == ARCH and version.num_classes == 9
    assert "hf" in version.formats
