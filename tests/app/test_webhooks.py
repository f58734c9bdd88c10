"""Webhooks to a real HTTP receiver on loopback: signed, retried with backoff, given up on."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.webhooks import deliver_due, webhook_secret
from devkit.digits import register_digits
from graft.client import verify_signature


class Receiver:
    def __init__(self, answers: list[int]) -> None:
        self.answers, self.requests = answers, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def receiver():
    r = Receiver([500])
    yield r
    r.server.shutdown()


@pytest.fixture()
def quick(settings):
    return settings.model_copy(update={"webhook_backoff_s": 0.05, "webhook_max_attempts": 3})


def finished_job(client, base_weights, digit_splits, notify_url):
    from devkit.digits import digits_archive

    register_digits(client, base_weights)
    archive = digits_archive(digit_splits[1], old_per_class=2, new_shots=2)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    body = {"model": "digits", "dataset_id": dataset["id"]}
    if notify_url:
        body["notify_url"] = notify_url
    job = client.post("/v1/jobs", json=body).json()
    return client.post(f"/v1/jobs/{job['id']}/cancel").json()  # queued -> cancelled: final


def test_a_final_job_is_posted_signed_and_retried_until_delivered(
    client, quick, receiver, base_weights, digit_splits
):
    job = finished_job(client, base_weights, digit_splits, receiver.url)
    assert job["notify_url"] == receiver.url
    assert deliver_due(quick) == 0  # the receiver answered 500
    assert deliver_due(quick) == 0  # not due yet: backing off
    time.sleep(0.1)
    assert deliver_due(quick) == 1
    assert deliver_due(quick) == 0  # delivered once, never again
    assert len(receiver.requests) == 2
    headers, body = receiver.requests[-1]
    assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "cancelled"
    assert headers["Graft-Event"] == "job.cancelled"
    assert headers["Graft-Delivery"] == f"{job['id']}-2"
    secret = webhook_secret(quick)
    assert verify_signature(body, headers["Graft-Signature"], secret)
    assert not verify_signature(body + b" ", headers["Graft-Signature"], secret)
    assert not verify_signature(body, headers["Graft-Signature"], "another secret")


def test_delivery_gives_up_after_max_attempts(client, quick, base_weights, digit_splits):
    always_down = Receiver([503] * 10)
    finished_job(client, base_weights, digit_splits, always_down.url)
    for _ in range(6):
        deliver_due(quick)
        time.sleep(0.25)
    assert len(always_down.requests) == 3
    always_down.server.shutdown()


def test_jobs_without_a_url_send_nothing_and_bad_urls_are_422(
    client, quick, receiver, base_weights, digit_splits
):
    finished_job(client, base_weights, digit_splits, None)
    assert deliver_due(quick) == 0 and receiver.requests == []
    response = client.post(
        "/v1/jobs", json={"model": "digits", "dataset_id": "x", "notify_url": "ftp://example/hook"}
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "notify_url"


def test_webhooks_to_internal_addresses_are_refused_when_not_on_loopback(
    client, settings, receiver, base_weights, digit_splits
):
    from fastapi.testclient import TestClient

    from app.main import create_app

    job = finished_job(client, base_weights, digit_splits, receiver.url)
    guarded = settings.model_copy(
        update={"webhook_allow_private": False, "webhook_backoff_s": 0.01}
    )
    assert deliver_due(guarded) == 0 and receiver.requests == []  # checked at delivery too

    with TestClient(create_app(guarded)) as c:
        for url in (
            "http://127.0.0.1:9/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/x",
            "http://10.0.0.8/x",
        ):
            response = c.post(
                "/v1/jobs",
                json={
                    "model": "digits",
                    "base_version": 1,
                    "dataset_id": job["dataset_id"],
                    "notify_url": url,
                },
            )
            assert response.status_code == 422, url
            assert "non-public" in response.json()["detail"]


def test_a_webhook_goes_to_the_address_that_was_checked(
    client, quick, receiver, base_weights, digit_splits, monkeypatch
):
    """The name is resolved once, checked, and the connection made to that address (a name
    that rebinds between check and connect reaches nothing new); Host still names it."""
    import socket

    url = receiver.url.replace("127.0.0.1", "localhost")
    finished_job(client, base_weights, digit_splits, url)
    asked: list[str] = []
    resolve = socket.getaddrinfo

    def spy(host, *args, **kwargs):
        asked.append(host)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    receiver.answers.clear()
    assert deliver_due(quick) == 1
    assert asked.count("localhost") == 1
    headers, _ = receiver.requests[-1]
    assert headers["Host"] == f"localhost:{receiver.server.server_port}"
