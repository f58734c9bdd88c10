"""A real `graft serve` (API and worker) per test module, on a free port and a fresh data dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from devkit.net import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "GRAFT_PORT": str(port),
        "GRAFT_LOG_LEVEL": "WARNING",
    }
    log = (data_dir / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "graft.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("graft serve did not become ready:\n" + (data_dir / "serve.log").read_text())
    yield client, process, data_dir
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)
    client.close()
    for child in data_dir.iterdir():  # the module's models and datasets; its log stays
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.name != "serve.log":
            child.unlink()
