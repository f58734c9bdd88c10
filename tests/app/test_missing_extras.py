"""An architecture whose optional dependency is not installed is a clear 422 naming the extra to
install, not a traceback (the package is hidden from the import system for the test)."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.mark.parametrize(
    ("architecture", "package", "extra"),
    [
        ("hf:ViTForImageClassification", "transformers", "graft[hf]"),
        ("keras:digits", "keras", "graft[keras]"),
    ],
)
def test_a_missing_extra_is_a_422_that_names_it(client, monkeypatch, architecture, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    answer = client.post(
        "/v1/models",
        data={"name": "m", "architecture": architecture, "labels": json.dumps(["a", "b"])},
        files={"weights": ("w.bin", b"unused")},
    )
    assert answer.status_code == 422
    assert extra in answer.json()["detail"]
    assert answer.json()["errors"][0]["field"] == "architecture"
