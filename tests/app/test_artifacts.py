"""A version's files as a user downloads them: safetensors, ONNX and TorchScript, each
self-describing and giving the same logits on real scans; HEAD, byte ranges and resuming."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors
import safetensors.torch
import timm
import torch

from app import __version__
from devkit import digits as D
from devkit.digits import OLD, digits_archive, register_digits
from tests.app.test_api import assert_problem
from worker import pipeline

FORMATS = ["safetensors", "onnx", "torchscript"]


def download(client, path: str, format: str) -> bytes:
    response = client.get(f"{path}/artifact", params={"format": format})
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    return response.content


def assert_every_format_describes_itself_and_agrees(client, name, number, images, tmp_path):
    """Each format of version ``number`` carries the version's labels, preprocessing,
    architecture and parent, and all three give the same logits on ``images``."""
    path = f"/v1/models/{name}/versions/{number}"
    version = client.get(path).json()
    assert version["formats"] == FORMATS
    parent = "" if version["parent_version"] is None else str(version["parent_version"])
    described = {
        "architecture": version["architecture"],
        "labels": version["labels"],
        "preprocessing": version["preprocessing"],
        "model": name,
        "parent": parent,
        "graft_version": __version__,
    }
    x = D.tensors(images)

    # safetensors, rebuilt as the README shows: the reference the others must match
    weights = tmp_path / f"{name}-v{number}.safetensors"
    weights.write_bytes(download(client, path, "safetensors"))
    with safetensors.safe_open(str(weights), framework="pt") as f:
        labels = json.loads(f.metadata()["labels"])
    model = timm.create_model(
        version["architecture"].removeprefix("timm:"), num_classes=len(labels)
    )
    model.load_state_dict(safetensors.torch.load_file(str(weights)))
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    assert labels == version["labels"]

    graph = download(client, path, "onnx")
    props = {p.key: p.value for p in onnx.load_from_string(graph).metadata_props}
    as_json = ("labels", "preprocessing")  # strings, lists and dicts as JSON
    assert {**props, **{k: json.loads(props[k]) for k in as_json}} == described
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)

    extra = {"graft.json": ""}
    scripted = torch.jit.load(io.BytesIO(download(client, path, "torchscript")), _extra_files=extra)
    assert json.loads(extra["graft.json"]) == described
    with torch.inference_mode():
        logits = scripted(x).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)
    predicted = [version["labels"][i] for i in logits.argmax(1)]
    return predicted


def test_a_registered_version_1_downloads_in_every_format(
    client, base_weights, digit_splits, tmp_path
):
    response = register_digits(client, base_weights)
    assert response.status_code == 201, response.text
    assert response.json()["formats"] == FORMATS
    held = digit_splits[1]
    images = [held.of(d)[30] for d in OLD]
    predicted = assert_every_format_describes_itself_and_agrees(
        client, "digits", 1, images, tmp_path
    )
    assert sum(p == str(d) for p, d in zip(predicted, OLD, strict=True)) >= 8


def test_a_job_made_version_downloads_in_every_format(
    settings, client, model, digit_splits, tmp_path
):
    held = digit_splits[1]
    archive = digits_archive(held, old_per_class=20, new_shots=10)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()
    pipeline.run_job(job["id"], settings)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["config"]["export"] == ["onnx", "torchscript"]

    images = [held.of(d)[40] for d in [*OLD, 9]]  # scans the job never saw
    predicted = assert_every_format_describes_itself_and_agrees(
        client, "digits", 2, images, tmp_path
    )
    assert client.get("/v1/models/digits/versions/2").json()["labels"][-1] == "9"
    assert sum(p == str(d) for p, d in zip(predicted, [*OLD, 9], strict=True)) >= 8


def test_a_job_asked_for_no_exports_stores_safetensors_only(settings, client, model, digit_splits):
    archive = digits_archive(digit_splits[1], old_per_class=3, new_shots=3)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post(
        "/v1/jobs",
        json={"model": "digits", "dataset_id": dataset["id"], "config": {"export": []}},
    ).json()
    pipeline.run_job(job["id"], settings)
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    assert client.get("/v1/models/digits/versions/2").json()["formats"] == ["safetensors"]
    for method in ("GET", "HEAD"):
        response = client.request(
            method, "/v1/models/digits/versions/2/artifact", params={"format": "torchscript"}
        )
        assert response.status_code == 404
    body = assert_problem(
        client.get("/v1/models/digits/versions/2/artifact?format=onnx"),
        404,
        says="has no onnx file",
    )
    assert body["detail"].endswith("available: safetensors")


# csatv2's pooling does not export to ONNX (torch's exporter cannot read its input size); it
# traces to TorchScript. If a later torch exports it, pick another architecture that fails.
UNEXPORTABLE = "timm:csatv2"


@pytest.fixture()
def unexportable(client, tmp_path):
    """A real architecture that ONNX cannot export, registered (random weights)."""
    model = timm.create_model(UNEXPORTABLE.removeprefix("timm:"), num_classes=len(OLD))
    weights = tmp_path / "csatv2.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(weights)
    )
    prep = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}
    response = client.post(
        "/v1/models",
        data={
            "name": "dct",
            "architecture": UNEXPORTABLE,
            "labels": json.dumps([str(d) for d in OLD]),
            "preprocessing": json.dumps(prep),
        },
        files={"weights": ("w.safetensors", weights.read_bytes())},
    )
    assert response.status_code == 201, response.text
    return response.json(), model.eval()


def test_an_architecture_onnx_cannot_export_registers_with_the_formats_it_has(unexportable, client):
    version, model = unexportable
    assert version["formats"] == ["safetensors", "torchscript"]
    body = assert_problem(
        client.get("/v1/models/dct/versions/1/artifact?format=onnx"), 404, says="has no onnx"
    )
    assert "available: safetensors, torchscript" in body["detail"]
    assert client.head("/v1/models/dct/versions/1/artifact?format=onnx").status_code == 404

    response = client.get("/v1/models/dct/versions/1/artifact?format=torchscript")
    extra = {"graft.json": ""}
    scripted = torch.jit.load(io.BytesIO(response.content), _extra_files=extra)
    assert json.loads(extra["graft.json"])["architecture"] == UNEXPORTABLE
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-3, atol=1e-4)


def test_a_job_on_it_succeeds_and_warns_which_format_is_missing(
    unexportable, settings, client, digit_splits
):
    archive = digits_archive(digit_splits[1], old_per_class=3, new_shots=3)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "dct", "dataset_id": dataset["id"]}).json()
    pipeline.run_job(job["id"], settings)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert client.get("/v1/models/dct/versions/2").json()["formats"] == [
        "safetensors",
        "torchscript",
    ]
    (warning,) = [w for w in job["warnings"] if "onnx" in w]
    assert "has no onnx file" in warning and "safetensors, torchscript" in warning


class TestDownloads:
    """HEAD, byte ranges and resuming, on the local store (tests/core/test_storage.py: S3)."""

    URL = "/v1/models/digits/versions/1/artifact"

    @pytest.fixture()
    def whole(self, client, model) -> bytes:
        response = client.get(self.URL)
        assert response.headers["accept-ranges"] == "bytes"
        return response.content

    def test_head_answers_the_headers_of_get_without_the_file(self, client, whole):
        for format in FORMATS:
            got = client.get(self.URL, params={"format": format})
            head = client.head(self.URL, params={"format": format})
            assert head.status_code == 200 and head.content == b""
            for header in (
                "content-length",
                "etag",
                "content-type",
                "content-disposition",
                "accept-ranges",
            ):
                assert head.headers[header] == got.headers[header], header
            assert head.headers["etag"] == f'"{hashlib.sha256(got.content).hexdigest()}"'
        assert head.headers["content-disposition"].endswith('"digits-v1.torchscript.pt"')

    def test_a_range_answers_206_with_those_bytes(self, client, whole):
        size = len(whole)
        for asked, (start, stop) in {
            "bytes=0-99": (0, 100),
            "bytes=100-": (100, size),
            "bytes=-64": (size - 64, size),
            f"bytes={size - 10}-{size + 999}": (size - 10, size),  # an end past it is cut
        }.items():
            response = client.get(self.URL, headers={"Range": asked})
            assert response.status_code == 206, asked
            assert response.content == whole[start:stop], asked
            assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
            assert int(response.headers["content-length"]) == stop - start
            head = client.head(self.URL, headers={"Range": asked})
            assert head.status_code == 206 and head.content == b""
            assert head.headers["content-range"] == response.headers["content-range"]

    @pytest.mark.parametrize("asked", ["bytes={size}-", "bytes=5-2", "bytes=abc", "bytes=-0"])
    def test_a_range_it_cannot_answer_is_416(self, client, whole, asked):
        size = len(whole)
        response = client.get(self.URL, headers={"Range": asked.format(size=size)})
        assert_problem(response, 416, says="cannot answer Range")
        assert response.headers["content-range"] == f"bytes */{size}"

    def test_several_ranges_another_unit_or_another_file_get_the_whole_file(self, client, whole):
        for headers in (
            {"Range": "bytes=0-9,20-29"},
            {"Range": "items=0-9"},
            {"Range": "bytes=0-9", "If-Range": '"not-this-file"'},
        ):
            response = client.get(self.URL, headers=headers)
            assert response.status_code == 200 and response.content == whole, headers

    def test_a_download_cut_off_midway_resumes_to_the_same_bytes(self, client, whole):
        received = bytearray()
        with client.stream("GET", self.URL) as response:
            etag = response.headers["etag"]
            for chunk in response.iter_bytes(64 * 1024):
                received += chunk
                if len(received) >= len(whole) // 3:
                    break  # the connection drops
        assert 0 < len(received) < len(whole)
        rest = client.get(self.URL, headers={"Range": f"bytes={len(received)}-", "If-Range": etag})
        assert rest.status_code == 206
        received += rest.content
        assert hashlib.sha256(received).hexdigest() == etag.strip('"')
        assert bytes(received) == whole
