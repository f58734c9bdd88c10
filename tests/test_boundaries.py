"""Architecture rules: the engine is a plain PyTorch library; the API never imports tasks."""

from __future__ import annotations

import subprocess
import sys

ENGINE_MODULES = [
    "worker.engine.expand",
    "worker.engine.export",
    "worker.engine.weights",
    "worker.engine.intake",
    "worker.engine.artifacts",
    "worker.engine.probe",
]


def loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {
        name.split(".")[0] if not name.startswith("worker.") else name
        for name in out.stdout.split()
    }


def test_the_engine_imports_no_web_queue_or_database_code():
    loaded = loaded_after_import(ENGINE_MODULES)
    assert not {"app", "celery", "fastapi", "sqlalchemy", "kombu", "starlette"} & loaded
    assert "torch" in loaded


def test_the_api_never_imports_the_tasks_module():
    loaded = loaded_after_import(["app.main"])
    assert "worker.tasks" not in loaded and "worker.pipeline" not in loaded
