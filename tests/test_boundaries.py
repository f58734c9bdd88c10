"""Architecture rules, as import contracts (``[tool.importlinter]`` in pyproject.toml): four
layers importing only downward (the CLI; the API and the worker, neither importing the other;
the shared core; the engine); the engine is plain PyTorch; the client and the CLI's output
need no server code; what ships imports neither the tests nor ``devkit``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept():
    linter = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in done.stdout, done.stdout[-3000:]
