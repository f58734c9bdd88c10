"""The README's failure table and the tests that show it are one list: every row has a test
marked with it, and every marked test names a row (bench/faults.py prints the table from
them)."""

from __future__ import annotations

import ast
from pathlib import Path

from devkit.faults import readme_rows

TESTS = Path(__file__).resolve().parent


def marked() -> dict[str, list[str]]:
    """failure -> the tests marked ``@pytest.mark.fault(failure)``."""
    found: dict[str, list[str]] = {}
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and ast.unparse(decorator.func) == "pytest.mark.fault"
                ):
                    failure = ast.literal_eval(decorator.args[0])
                    found.setdefault(failure, []).append(f"{path.name}::{node.name}")
    return found


def test_every_row_of_the_failure_table_has_a_test_and_every_fault_test_a_row():
    rows, tests = readme_rows(), marked()
    assert len(rows) >= 15
    assert set(rows) - set(tests) == set(), "rows no test shows"
    assert set(tests) - set(rows) == set(), "fault tests naming no row of the README"
