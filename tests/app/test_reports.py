"""Reports of a real finished job: the HTML as headless Chromium shows it, and the PNG."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest
from PIL import Image

from devkit.digits import digits_archive, register_digits


@pytest.fixture()
def finished(grown_model):
    """A job that grew digits v2 from 20 images of each old digit and 10 nines."""
    return grown_model


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
            pytest.fail("headless Chromium is needed (apt-get install chromium)")
        pytest.skip("no Chromium on this machine")
    return path


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_the_html_report_shows_what_happened(client, finished, tmp_path):
    response = client.get(f"/v1/jobs/{finished['id']}/report")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = tmp_path / "report.html"
    page.write_text(response.text)
    browser = chromium()
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    gate = finished["metrics"]["gate"]
    assert f'id="verdict">{gate["decision"]}</span>' in dom
    assert f"({gate['evidence']}" in dom  # the gate says how much it rests on
    assert "Old classes: accuracy before and after" in dom
    assert "<svg" in dom if finished["metrics"]["history"] else "refitted as one convex" in dom
    assert "new-class calibration</th><td>" in dom and "held-out images" in dom
    n_old = finished["metrics"]["old_classes"]["n"]
    assert f"n={n_old})" in dom and "5-fold cross-fitting" in dom  # every figure has its n
    assert dom.count("<tr>") >= 9 + 1 + 10  # every old class, the new one, the matrix rows
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1_000_000) or []
    assert len(colours) > 50  # text, tables, the heat-mapped matrix and the curve: not blank
    blue_cells = sum(n for n, (r, g, b) in colours if b > 150 and r < 150)
    assert blue_cells > 1000  # the confusion matrix's diagonal is drawn


def test_the_png_report_is_a_picture(client, finished):
    response = client.get(f"/v1/jobs/{finished['id']}/report.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (1200, 900)


def test_no_report_before_success(client, base_weights, digit_splits):
    register_digits(client, base_weights)
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}).json()
    response = client.get(f"/v1/jobs/{job['id']}/report")
    assert response.status_code == 409 and "succeeded" in response.json()["detail"]
