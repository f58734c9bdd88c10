"""Graft's real entry points as subprocesses, for tests that drive them over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devkit.net import free_port


def start_api(data_dir: Path, **env: str) -> tuple[subprocess.Popen, int]:
    """`graft db upgrade`, then `graft api` on a free port; its output goes to data_dir/api.log."""
    port = free_port()
    environ = {**os.environ, "GRAFT_DATA_DIR": str(data_dir), "GRAFT_PORT": str(port), **env}
    subprocess.run([sys.executable, "-m", "graft.cli", "db", "upgrade"], env=environ, check=True)
    log = (data_dir / "api.log").open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "graft.cli", "api"], env=environ, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("graft api did not start:\n" + (data_dir / "api.log").read_text())
