"""report.png is drawn in the API's thread pool: renders at the same moment must not mix."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from PIL import Image

from app.reports import render_png
from app.schemas import JobRead

OLD = [str(d) for d in range(9)]


def report(n: int) -> JobRead:
    """A succeeded job whose figures differ from those of every other ``n``."""
    rng = random.Random(n)
    labels = [*OLD, "9"]
    matrix = [[rng.randint(0, 20) for _ in labels] for _ in labels]
    per_class = {
        label: {"recall": rng.random(), "precision": rng.random(), "support": 20}
        for label in labels
    }
    history = [
        {"epoch": e, "train_loss": rng.random(), "val_accuracy": rng.random()}
        for e in range(1, 6 + n % 5)
    ]
    return JobRead(
        id=f"job{n}",
        status="succeeded",
        model=f"model-{n}",
        base_version=1 + n,
        dataset_id="d",
        new_labels=["9"],
        config={},
        progress={"stage": "done", "fraction": 1.0},
        metrics={
            "old_classes": {"recall_before": {k: rng.random() for k in OLD}, "n": 180},
            "new_classes": {"n": 20},
            "per_class": per_class,
            "confusion_matrix": {"labels": labels, "matrix": matrix},
            "history": history,
        },
        result={"model": f"model-{n}", "version": 2 + n},
        error=None,
        attempt=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_concurrent_renders_each_draw_their_own_report():
    jobs = [report(n) for n in range(6)]
    alone = [render_png(job) for job in jobs]
    assert len(set(alone)) == len(jobs)  # every report is its own picture
    for png in alone:
        assert Image.open(io.BytesIO(png)).size == (1200, 900)

    order = [n for n in range(len(jobs)) for _ in range(6)]
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda n: (n, render_png(jobs[n])), order))
    wrong = [n for n, png in together if png != alone[n]]
    assert not wrong, f"{len(wrong)} of {len(together)} concurrent renders differ: {wrong}"


def run_python(script: str) -> None:
    """Run ``script`` in a fresh interpreter: matplotlib's global state is per process."""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_rendering_leaves_the_process_backend_alone():
    """Rendering neither switches the process's matplotlib backend nor starts pyplot (whose
    figure manager is one global state that threads share)."""
    run_python(
        """
import sys
import matplotlib
matplotlib.use("svg")
from app.reports import render_png
from tests.app.test_report_threads import report
render_png(report(1))
assert matplotlib.get_backend() == "svg", f"the backend became {matplotlib.get_backend()}"
assert "matplotlib.pyplot" not in sys.modules, "rendering imported pyplot"
"""
    )


def test_the_charts_show_small_drops_and_say_when_there_are_no_epochs():
    from app.reports import report_figure

    job = report(0)
    job.metrics["history"] = []  # a head fitted in closed form
    job.metrics["old_classes"]["recall_before"] = {k: 0.97 for k in OLD}
    job.metrics["per_class"] |= {k: {"recall": 0.93, "precision": 0.9} for k in OLD}
    old, _, _, curve = report_figure(job).axes
    bottom, top = old.get_ylim()
    assert 0.8 <= bottom < 0.93 and top > 0.97  # a 4-point drop is a visible step
    assert "axis from" in old.get_title()
    assert not curve.axison and "No epochs" in " ".join(t.get_text() for t in curve.texts)
