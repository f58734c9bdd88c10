"""The schema fuzzing of test_schema.py, against PostgreSQL: what PostgreSQL refuses (a NUL in
any text, an integer past int4) must be refused before it, as a 4xx, on every route. The app
needs the private cluster, which exists only once tests run, so every operation's cases are
drawn inside one test (schemathesis' strategies driven by Hypothesis directly)."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.core.test_schema import CHECKS


def test_the_api_honours_its_schema_on_postgresql(postgres_url, tmp_path):
    from app.auth import create_key
    from app.main import create_app
    from core.db import session_scope
    from core.migrate import db_upgrade
    from core.settings import Settings

    config = Settings(
        database_url=postgres_url,
        data_dir=tmp_path,
        sweep_interval_s=0,
        max_upload_bytes=2 * 1024 * 1024,
    )
    db_upgrade(config)
    with session_scope(config.resolved_database_url) as session:
        key = create_key(session, "fuzzer")[0]
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(config))
    seen: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {key}"}, checks=CHECKS
            )
            seen.append(response.status_code)

        fuzz()
    assert len(operations) > 20 and len(seen) > 100
    assert {200, 404, 422} <= set(seen), sorted(set(seen))
