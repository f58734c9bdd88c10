"""`graft serve` as a user runs it: a real server process with its Celery worker, over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import safetensors
import safetensors.torch
import timm
import torch

from devkit import digits as D
from devkit.digits import OLD, digits_archive, register_digits

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    seen = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line.removeprefix("data: "))))
    return seen


def test_from_nothing_to_a_downloaded_version_that_knows_the_new_label(
    server, base_weights, digit_splits, tmp_path
):
    client, _, data_dir = server
    _, held = digit_splits
    assert register_digits(client, base_weights).status_code == 201
    archive = digits_archive(held, old_per_class=40, new_shots=15)
    dataset = client.post("/v1/datasets", files={"archive": ("digits.zip", archive)}).json()
    started = time.monotonic()
    body = {
        "model": "digits",
        "dataset_id": dataset["id"],
        "config": {"augmentation": {"views": 8, "rotation_degrees": 8, "scale": [0.9, 1.1]}},
    }
    submitted = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first-try"})
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]

    stream = events(client, job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded", job["error"]
    assert stream[-1] == ("status", job)
    stages = [data["progress"]["stage"] for _, data in stream]
    assert "extracting" in stages, stages

    m = job["metrics"]
    assert m["old_classes"]["n"] >= 70 and m["new_classes"]["n"] >= 3
    assert m["old_classes"]["accuracy_before"] > 0.95
    assert m["old_classes"]["retention"] >= 0.95
    assert m["timing"]["total_s"] > 0 and m["device"] == "cpu"

    download = client.get("/v1/models/digits/versions/2/artifact")
    path = tmp_path / "digits-v2.safetensors"
    path.write_bytes(download.content)
    assert (
        download.headers["etag"].strip('"')
        == client.get("/v1/models/digits/versions/2").json()["sha256"]
    )

    # Rebuild from the file alone, as a user of the artifact would.
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    labels = json.loads(meta["labels"])
    assert meta["architecture"] == "timm:resnet18" and meta["parent"] == "1"
    assert labels == [str(d) for d in OLD] + ["9"]
    model = timm.create_model(meta["architecture"].split(":", 1)[1], num_classes=len(labels))
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    model.eval()

    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = torch.tensor([d for d in range(10) for _ in held.of(d)[40:]])
    with torch.inference_mode():
        x = D.tensors(images)
        after = model(x).argmax(1)
        base = timm.create_model("resnet18", num_classes=9)
        base.load_state_dict(safetensors.torch.load_file(str(base_weights)))
        before = base.eval()(x).argmax(1)
    old = targets < 9
    acc_before = (before[old] == targets[old]).float().mean().item()
    acc_after = (after[old] == targets[old]).float().mean().item()
    recall = (after[~old] == 9).float().mean().item()
    print(
        f"\nold-class accuracy {acc_before:.4f} -> {acc_after:.4f}, new-class recall "
        f"{recall:.3f}, 15 shots, job {elapsed:.1f}s (held-out, {int(old.sum())} old images)"
    )
    assert acc_before - acc_after < 0.02
    assert recall > 0.6

    onnx_file = tmp_path / "digits-v2.onnx"
    onnx_file.write_bytes(client.get("/v1/models/digits/versions/2/artifact?format=onnx").content)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x[:8].numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(x[:8]).numpy(), rtol=1e-3, atol=1e-4)

    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "first-try"})
    assert again.json()["id"] == job_id
    assert not list((data_dir / "tmp").iterdir())


def test_cancel_stops_a_running_job(server, digit_splits, base_weights):
    client, _, _ = server
    _, held = digit_splits
    assert register_digits(client, base_weights, name="cancel-me").status_code == 201
    archive = digits_archive(held, old_per_class=40, new_shots=15)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post(
        "/v1/jobs",
        json={
            "model": "cancel-me",
            "dataset_id": dataset["id"],
            "config": {"augmentation": {"views": 64, "rotation_degrees": 10}},
        },
    ).json()
    deadline = time.monotonic() + 600  # safety nets against a hang, not measures of speed
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    while (status := client.get(f"/v1/jobs/{job['id']}").json()["status"]) not in FINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == "cancelled"  # 64 views of every image: stopped long before the end
    assert len(client.get("/v1/models/cancel-me").json()["versions"]) == 1


def test_sigint_stops_the_api_and_the_worker(server):
    _, process, data_dir = server
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    worker_pids = {int(p) for p in workers.stdout.split()}
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    time.sleep(0.5)
    for pid in worker_pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
