"""Property-based tests of the whole HTTP API against its own OpenAPI schema (schemathesis):
no input may cause a server error, and every answer must be one the schema declares."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth import create_key
from app.main import create_app
from core.db import session_scope
from core.migrate import db_upgrade
from core.settings import Settings

# The schema must exist when tests are collected, so the app is built at import.
_data = Path(tempfile.mkdtemp(prefix="graft-schema-"))
atexit.register(shutil.rmtree, _data, ignore_errors=True)
SETTINGS = Settings(data_dir=_data, sweep_interval_s=0, max_upload_bytes=2 * 1024 * 1024)
db_upgrade(SETTINGS)
with session_scope(SETTINGS.resolved_database_url) as _session:
    KEY = create_key(_session, "fuzzer")[0]
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(SETTINGS))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


SEEN: list[tuple[str, int]] = []  # (operation, status) of every case


# One pytest item per operation, each a Hypothesis test of its own (schemathesis' own
# parametrisation makes one item that pytest-xdist runs for its first operation only).
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.label)
def test_the_api_honours_its_schema(operation):
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def honoured(case):
        headers = {"Authorization": f"Bearer {KEY}"}
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        SEEN.append((case.operation.label, response.status_code))

    honoured()


def test_the_fuzzer_got_past_authentication():
    """Runs after the cases above: they must have reached every route, and its answers, not
    just the key check."""
    assert {operation for operation, _ in SEEN} == {operation.label for operation in OPERATIONS}
    statuses = {status for _, status in SEEN}
    assert {200, 404, 422} <= statuses, sorted(statuses)


def test_every_job_option_is_explained_in_the_api_reference(client):
    """Swagger (/docs) shows each job setting with what it does."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("JobConfig", "AugmentationConfig", "GateConfig"):
        unexplained = [
            field
            for field, spec in schemas[name]["properties"].items()
            if not spec.get("description")
        ]
        assert unexplained == [], (name, unexplained)
