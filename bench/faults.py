"""The README's "How jobs survive failures" table, run: every row's tests, and what they saw.

Runs the tests marked ``@pytest.mark.fault`` (real PostgreSQL and Redis servers of their own,
real worker processes killed, frozen, cut off; pollers asking the API throughout) and prints
fault | expected | observed | test | pass | seconds, in the README's order. The same tests run
in CI with the rest of the suite; this script prints their table.

`.venv/bin/python bench/faults.py [-k EXPR]` (about 6 minutes on 2 cores). Exit status 1 if a
row fails or has no test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.faults import readme_rows  # noqa: E402


@dataclass
class Outcome:
    test: str
    fault: str
    observed: list[str]
    result: str  # passed, failed, error, skipped
    seconds: float


def run(expression: str | None) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="graft-faults-") as folder:
        report = Path(folder) / "junit.xml"
        argv = [sys.executable, "-m", "pytest", "-m", "fault", "-q", "-p", "no:cacheprovider"]
        argv += [f"--junitxml={report}", "-o", "junit_family=xunit1"]
        if expression:
            argv += ["-k", expression]
        env = {**os.environ, "GRAFT_REQUIRE_SERVICES": "1"}
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.exists():
            sys.exit(f"pytest wrote no report\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        cases = ET.parse(report).getroot().iter("testcase")
        return [_outcome(case) for case in cases]


def _outcome(case: ET.Element) -> Outcome:
    properties = [(p.get("name"), p.get("value") or "") for p in case.iter("property")]
    result = "passed"
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            result = {"failure": "failed"}.get(tag, tag)
    return Outcome(
        test=f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
        fault=next((v for k, v in properties if k == "fault"), ""),
        observed=[v for k, v in properties if k == "observed"],
        result=result,
        seconds=float(case.get("time") or 0),
    )


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-k", dest="expression", help="only the tests pytest -k selects")
    args = parser.parse_args()
    started = time.monotonic()
    rows = readme_rows()
    outcomes = run(args.expression)
    print("| fault | expected (README) | observed | test | pass | s |")
    print("|---|---|---|---|---|---:|")
    missing = []
    for fault, expected in rows.items():
        shown = [o for o in outcomes if o.fault == fault]
        if not shown:
            missing.append(fault)
            if not args.expression:
                print(f"| {cell(fault)} | {cell(expected)} | no test | - | no | - |")
        for i, o in enumerate(shown):
            print(
                f"| {cell(fault) if i == 0 else ''} | {cell(expected) if i == 0 else ''} "
                f"| {cell('; '.join(o.observed)) or '-'} | `{o.test}` "
                f"| {'yes' if o.result == 'passed' else o.result} | {o.seconds:.0f} |"
            )
    passed = sum(o.result == "passed" for o in outcomes)
    print(
        f"\n{passed} of {len(outcomes)} fault tests passed; {len(rows) - len(missing)} of "
        f"{len(rows)} rows shown; {time.monotonic() - started:.0f} s in all "
        f"({os.cpu_count()} CPUs, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})."
    )
    bad = passed < len(outcomes) or (missing and not args.expression)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
