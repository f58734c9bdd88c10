"""The README's "How jobs survive failures" table, made executable.

A test that shows a row carries ``@pytest.mark.fault("<the row's failure>")``; what it saw
(timings, attempts, what pollers were answered meanwhile) it says with the ``observed``
fixture. Both land in the test's ``user_properties`` (and so in pytest's JUnit XML), from which
``bench/faults.py`` prints fault | expected | observed | pass. ``tests/test_fault_table.py``
keeps the markers and the README's rows the same set."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "How jobs survive failures"


def readme_rows(readme: Path = README) -> dict[str, str]:
    """failure -> what happens, from the README's table under HEADING."""
    text = readme.read_text()
    table = text[text.index(HEADING) :].split("\n\n", 2)[1]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:  # after the header and its rule
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


class Pollers:
    """A client polling the API every ``every_s`` while a fault happens: answers by status,
    failures by exception, and the longest wait between two answers."""

    def __init__(self, get, path: str = "/v1/jobs?limit=5", every_s: float = 0.1) -> None:
        self.get, self.path, self.every_s = get, path, every_s
        self.statuses: Counter[str] = Counter()
        self.longest_s = 0.0
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="pollers", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        last = time.monotonic()
        while not self.halt.wait(self.every_s):
            try:
                self.statuses[str(self.get(self.path).status_code)] += 1
            except Exception as exc:  # noqa: BLE001 (a poller reports; it does not fail)
                self.statuses[type(exc).__name__] += 1
            now = time.monotonic()
            self.longest_s, last = max(self.longest_s, now - last), now

    def stop(self) -> str:
        self.halt.set()
        self.thread.join()
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(self.statuses.items()))
        return f"pollers: {seen or 'no answer'}; longest wait {self.longest_s:.1f} s"

    def unexpected(self) -> dict[str, int]:
        """Answers no fault may cause: anything but 200 and 503 (the database is away)."""
        return {k: v for k, v in self.statuses.items() if k not in ("200", "503")}
