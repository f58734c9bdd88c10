"""Hostile model files sent to a real `graft api`: each is a 4xx naming the cause, none is a
5xx in the access log, and the API process does not grow by more than a stated budget.

The files are opened only in the sandbox's children; the API reads their first bytes and
streams them to disk. What a file can cost the API is its upload, not its contents.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from tests.support.model_files import HOSTILE, LABELS, PREP, linear_graph
from tests.support.processes import start_api

# What two rounds of every hostile upload may add to the API's memory, counted from after one
# valid registration (measured: 17 MiB, most of it importing transformers to check HF names).
RSS_BUDGET = 64 * 1024**2


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def register(client: httpx.Client, name: str, architecture: str, filename: str, blob: bytes):
    data = {
        "name": name,
        "architecture": architecture,
        "labels": json.dumps(LABELS),
        "preprocessing": json.dumps(PREP),
    }
    return client.post("/v1/models", data=data, files={"weights": (filename, blob)})


def test_hostile_models_are_refused_with_no_5xx_and_bounded_api_memory(tmp_path):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    process, port = start_api(data_dir, GRAFT_MODEL_CHECK_TIMEOUT_S="60")
    blobs = {upload.case: upload.make() for upload in HOSTILE}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:

            def round_of_uploads() -> dict[str, httpx.Response]:
                return {
                    u.case: register(client, "hostile", u.architecture, u.filename, blobs[u.case])
                    for u in HOSTILE
                }

            made = register(client, "fine", "onnx:o", "m.onnx", linear_graph().SerializeToString())
            assert made.status_code == 201, made.text
            before = rss(process.pid)
            round_of_uploads()
            answers = round_of_uploads()
            grown = rss(process.pid) - before

            for case, answer in answers.items():
                assert 400 <= answer.status_code < 500, (case, answer.status_code, answer.text)
                assert answer.headers["content-type"] == "application/problem+json", case
                assert answer.json()["detail"], case
            assert grown < RSS_BUDGET, f"the API grew by {grown / 1024**2:.0f} MiB"
            names = [m["name"] for m in client.get("/v1/models").json()["items"]]
            assert names == ["fine"]  # nothing hostile was stored
            assert client.get("/readyz").status_code == 200
    finally:
        process.kill()
        process.wait()
    time.sleep(0.1)
    log = (data_dir / "api.log").read_text()
    statuses = re.findall(r'HTTP/1\.1" (\d{3})', log)
    assert statuses.count("422") + statuses.count("413") >= len(HOSTILE), log[-2000:]
    assert not [s for s in statuses if s.startswith("5")], log[-4000:]
