"""/docs works on a machine with no internet: Swagger UI comes from the server itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from urllib.parse import urljoin, urlsplit

import pytest

CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No name resolves but the server's: the page gets no network beyond it.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

# Chromium's own requests, made whatever page it shows.
BROWSER_HOSTS = {"accounts.google.com", "clients2.google.com", "update.googleapis.com"}


def referenced(html: str) -> list[str]:
    """Every URL the page loads: src/href attributes and the OpenAPI document's url."""
    urls = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    urls += re.findall(r'\burl:\s*["\']([^"\']+)["\']', html)
    return urls


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("GRAFT_REQUIRE_SERVICES") == "1":
            pytest.fail("headless Chromium is needed (apt-get install chromium)")
        pytest.skip("no Chromium on this machine")
    return path


def test_docs_page_loads_only_same_origin_assets(server) -> None:
    client, _, _ = server
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    urls = referenced(page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("swagger-ui.css") for u in urls), urls
    assert any(u.endswith("openapi.json") for u in urls), urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"/docs loads {url} from another origin"
        asset = client.get(urljoin(str(client.base_url) + "/docs", url))
        assert asset.status_code == 200, url
        suffix = "." + parts.path.rsplit(".", 1)[-1]
        assert asset.headers["content-type"].startswith(CONTENT_TYPES[suffix]), url
        assert len(asset.content) > 0, url


def test_swagger_ui_license_ships_with_it(server) -> None:
    client, _, _ = server
    license_text = client.get("/static/swagger-ui/LICENSE")
    assert license_text.status_code == 200 and "Apache License" in license_text.text


def test_docs_page_renders_every_operation_with_no_network(server, tmp_path) -> None:
    client, _, _ = server
    browser = chromium()
    net_log = tmp_path / "net.json"
    flags = [
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--log-net-log={net_log}",
        "--virtual-time-budget=20000",  # lets the page fetch the schema and render it
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", f"{client.base_url}/docs"],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    schema = client.get("/openapi.json").json()
    assert 'class="swagger-ui' in dom, dom[:2000]
    for path in schema["paths"]:
        assert f'data-path="{path}"' in dom, f"{path} is not on the rendered page"
    # What was asked of the network, the browser's own update and sign-in checks aside: the
    # server only.
    requested = set(re.findall(r'"url"\s*:\s*"([^"]+)"', net_log.read_text()))
    hosts = {urlsplit(url).hostname for url in requested if url.startswith("http")}
    assert hosts - BROWSER_HOSTS == {"127.0.0.1"}, sorted(requested)
