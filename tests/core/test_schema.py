"""Property-based tests of the whole HTTP API against its own OpenAPI schema (schemathesis):
no input may cause a server error, and every answer must be one the schema declares."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
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


SEEN: list[int] = []


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_honours_its_schema(case):
    response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
    SEEN.append(response.status_code)


def test_the_fuzzer_got_past_authentication():
    """Runs after the cases above: they must have reached the routes, not just the key check."""
    assert len(SEEN) > 100
    assert {200, 404, 422} <= set(SEEN), sorted(set(SEEN))


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
