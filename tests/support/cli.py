"""`graft ARGS` as a script runs it: output piped, against the server at ``url``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_graft(
    url: str, *args: str, columns: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The command's result; ``columns``: a terminal's width (COLUMNS), else none set."""
    env = {**os.environ, "GRAFT_URL": url}
    env.pop("GRAFT_API_KEY", None)
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "graft.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
