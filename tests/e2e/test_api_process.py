"""A real `graft api` process stopped the hard and the soft way: killed mid-upload it leaves
nothing behind after one sweep; asked to stop, it does not wait forever on a slow client."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import httpx

from core import janitor
from core.settings import Settings
from devkit import digits as D
from tests.support.processes import start_api


def test_an_api_killed_while_unpacking_an_upload_leaves_nothing_after_one_sweep(
    tmp_path, digit_splits
):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    process, port = start_api(data_dir)
    _, held = digit_splits
    images = held.of(3)
    archive = D.zip_image_folder({str(d): images * 20 for d in range(10)})  # ~36,000 images

    def upload() -> None:
        with contextlib.suppress(httpx.TransportError):  # the server dies under it
            httpx.post(
                f"http://127.0.0.1:{port}/v1/datasets",
                files={"archive": ("big.zip", archive)},
                timeout=300,
            )

    threading.Thread(target=upload, daemon=True).start()
    tmp = data_dir / "tmp"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("dataset-") for p in tmp.glob("*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert any(tmp.iterdir())  # what the kill left

    settings = Settings(data_dir=data_dir, orphan_grace_s=0)
    janitor.clean(settings)
    assert list(tmp.iterdir()) == []
    artifacts = data_dir / "artifacts"
    assert not artifacts.exists() or not [p for p in artifacts.rglob("*") if p.is_file()]

    process, port = start_api(data_dir)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/v1/datasets").json()["items"] == []
    finally:
        process.kill()


def test_a_stopping_api_does_not_wait_forever_on_a_slow_upload(tmp_path):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    process, port = start_api(data_dir, GRAFT_SHUTDOWN_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(
            b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000000\r\n\r\n--b\r\n"
        )  # ...and nothing more
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        finally:
            process.kill()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    assert "timeout graceful shutdown exceeded" in (data_dir / "api.log").read_text()
