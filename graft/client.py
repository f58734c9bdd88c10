"""A typed Python client for the Graft HTTP API.

    from graft.client import Client

    graft = Client()                                   # GRAFT_URL, GRAFT_API_KEY from the env
    graft.register_model("digits", "timm:resnet18", labels, "digits.safetensors")
    dataset = graft.push_dataset("images/")            # an ImageFolder, zipped on the fly
    job = graft.submit_job("digits", dataset.id)
    job = graft.wait(job.id, on_progress=lambda j: print(j.progress.stage, j.progress.fraction))
    graft.download("digits", job.result.version, "digits-v2.onnx", format="onnx")

Results are the API's own pydantic schemas; errors are :class:`GraftError` carrying the
problem+json body.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.schemas import (
    DatasetRead,
    EvaluationRead,
    JobRead,
    ModelRead,
    ModelVersionRead,
    ReferenceRead,
)

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = ("succeeded", "failed", "cancelled")
ProgressCallback = Callable[[JobRead], None]
# The API sends a keep-alive every 15 s: an event stream silent this long is dead.
STREAM_SILENCE_S = 45.0
# The longest ``wait`` gives its last poll once its timeout is (nearly) spent.
LAST_LOOK_S = 1.0


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value); None without one."""
    return None if deadline is None else deadline - time.monotonic()


# What Graft reads of a Hugging Face save_pretrained folder.
HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@contextlib.contextmanager
def _weights_file(path: Path) -> Iterator[tuple[str, Any]]:
    """A weights file as it is, or a Hugging Face model folder zipped on the fly (only the
    files Graft reads)."""
    if not path.is_dir():
        with path.open("rb") as f:
            yield path.name, f
        return
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w") as zf:
            for name in HF_FILES:
                if (path / name).is_file():
                    zf.write(path / name, name)
        f.seek(0)
        yield f"{path.name}.zip", f


def verify_signature(body: bytes, header: str, secret: str, tolerance_s: float = 300) -> bool:
    """Check a webhook's ``Graft-Signature`` header: the HMAC matches and it is recent."""
    import hmac

    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    fresh = abs(time.time() - timestamp) <= tolerance_s
    return fresh and hmac.compare_digest(expected, fields.get("v1", ""))


class GraftError(Exception):
    """The API answered with an error (``status`` and the problem+json body), or could not be
    reached (``status`` 0)."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail, self.problem = status, detail, problem or {}


class Client:
    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        self.url = (url or os.environ.get("GRAFT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("GRAFT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GraftError(0, f"cannot reach Graft at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = problem.get("detail") or response.reason_phrase
            except ValueError:
                problem, detail = None, response.text[:200] or response.reason_phrase
            raise GraftError(response.status_code, detail, problem)
        return response

    # Models ---------------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        architecture: str,
        labels: list[str],
        weights: str | Path,
        preprocessing: dict | None = None,
        reference_dataset_id: str | None = None,
        gate: dict | None = None,
    ) -> ModelVersionRead:
        data = {"name": name, "architecture": architecture, "labels": json.dumps(labels)}
        if preprocessing:
            data["preprocessing"] = json.dumps(preprocessing)
        if reference_dataset_id:
            data["reference_dataset_id"] = reference_dataset_id
        if gate:
            data["gate"] = json.dumps(gate)
        with _weights_file(Path(weights)) as (filename, f):
            response = self._request(
                "POST", "/v1/models", data=data, files={"weights": (filename, f)}
            )
        return ModelVersionRead.model_validate(response.json())

    def get_model(self, name: str) -> ModelRead:
        return ModelRead.model_validate(self._request("GET", f"/v1/models/{name}").json())

    def set_gate(self, name: str, settings: dict[str, float | int]) -> ModelRead:
        """Set the gate's settings for the model's jobs (those not given: the defaults)."""
        response = self._request("PUT", f"/v1/models/{name}/gate", json=settings)
        return ModelRead.model_validate(response.json())

    def get_version(self, name: str, version: int) -> ModelVersionRead:
        response = self._request("GET", f"/v1/models/{name}/versions/{version}")
        return ModelVersionRead.model_validate(response.json())

    def add_reference(self, name: str, version: int, dataset_id: str) -> ReferenceRead:
        """Add a dataset's images of the version's labels to its reference set."""
        response = self._request(
            "POST",
            f"/v1/models/{name}/versions/{version}/reference",
            json={"dataset_id": dataset_id},
        )
        return ReferenceRead.model_validate(response.json())

    def promote(self, name: str, version: int, reason: str | None = None) -> ModelRead:
        """Make a version the latest on purpose (a promotion, or a roll-back)."""
        response = self._request(
            "POST", f"/v1/models/{name}/versions/{version}/promote", json={"reason": reason}
        )
        return ModelRead.model_validate(response.json())

    def list_models(self) -> list[ModelRead]:
        return [ModelRead.model_validate(m) for m in self._pages("/v1/models", {})]

    def delete_model(self, name: str, force: bool = False) -> None:
        """Delete a model and every version of it. The API refuses (409) while a job uses the
        model; ``force`` deletes it anyway."""
        self._request("DELETE", f"/v1/models/{name}", params={"force": "true"} if force else {})

    def delete_version(self, name: str, version: int, force: bool = False) -> None:
        """Delete one version. The API refuses (409) the model's last promoted version;
        ``force`` deletes it anyway."""
        self._request(
            "DELETE",
            f"/v1/models/{name}/versions/{version}",
            params={"force": "true"} if force else {},
        )

    def download(
        self,
        name: str,
        version: int,
        dest: str | Path,
        format: str = "safetensors",
        on_bytes: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Stream an artifact to ``dest`` and check its sha256 against the server's ETag; a
        partial or corrupt download leaves no file behind."""
        dest = Path(dest)
        path = f"/v1/models/{name}/versions/{version}/artifact"
        digest = hashlib.sha256()
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with self.http.stream("GET", path, params={"format": format}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise(response)
                total = int(response.headers.get("content-length", 0))
                done = 0
                with tmp.open("wb") as out:
                    for chunk in response.iter_bytes(1024 * 1024):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if on_bytes:
                            on_bytes(done, total)
                expected = response.headers.get("etag", "").strip('"')
            if expected and digest.hexdigest() != expected:
                raise GraftError(0, f"checksum mismatch downloading {name} v{version}")
            tmp.replace(dest)
        except httpx.TransportError as exc:
            raise GraftError(0, f"download interrupted: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # Datasets -------------------------------------------------------------------------------

    def push_dataset(self, source: str | Path, name: str | None = None) -> DatasetRead:
        """Upload an archive, or a local ImageFolder zipped on the fly into a temporary file
        (the upload streams from disk; memory use stays flat)."""
        source = Path(source)
        data = {"name": name} if name else {}
        if source.is_file():
            with source.open("rb") as f:
                response = self._request(
                    "POST", "/v1/datasets", data=data, files={"archive": (source.name, f)}
                )
            return DatasetRead.model_validate(response.json())
        with tempfile.TemporaryFile() as archive:
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    zf.write(path, path.relative_to(source).as_posix())
            archive.seek(0)
            response = self._request(
                "POST",
                "/v1/datasets",
                data=data,
                files={"archive": (f"{source.name or 'dataset'}.zip", archive)},
            )
        return DatasetRead.model_validate(response.json())

    def import_dataset(
        self, uri: str, *, manifest: bool = False, name: str | None = None
    ) -> DatasetRead:
        """Register images already in S3 by reference: ``uri`` is a prefix holding one folder
        per label (``s3://bucket/prefix/``), or with ``manifest`` a CSV of ``uri,label`` lines.
        The server copies them in the background; follow it with ``wait_dataset``."""
        body: dict[str, Any] = {"manifest" if manifest else "source": uri}
        if name:
            body["name"] = name
        return DatasetRead.model_validate(self._request("POST", "/v1/datasets", json=body).json())

    def wait_dataset(
        self,
        dataset_id: str,
        on_progress: Callable[[DatasetRead], None] | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> DatasetRead:
        """Poll a dataset until its import has ended (ready or failed), calling
        ``on_progress`` on every poll; GraftError (status 0) past ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            dataset = self.get_dataset(dataset_id)
            if on_progress:
                on_progress(dataset)
            if dataset.status != "importing":
                return dataset
            if deadline is not None and time.monotonic() >= deadline:
                raise GraftError(0, f"dataset {dataset_id} was still importing after {timeout} s")
            time.sleep(poll_interval)

    def get_dataset(self, dataset_id: str) -> DatasetRead:
        return DatasetRead.model_validate(self._request("GET", f"/v1/datasets/{dataset_id}").json())

    # Jobs -----------------------------------------------------------------------------------

    def submit_job(
        self,
        model: str,
        dataset_id: str,
        *,
        new_labels: list[str] | None = None,
        base_version: int | None = None,
        config: dict | None = None,
        notify_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobRead:
        body: dict[str, Any] = {"model": model, "dataset_id": dataset_id}
        for key, value in (
            ("new_labels", new_labels),
            ("base_version", base_version),
            ("config", config),
            ("notify_url", notify_url),
        ):
            if value is not None:
                body[key] = value
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/jobs", json=body, headers=headers)
        return JobRead.model_validate(response.json())

    def get_job(self, job_id: str) -> JobRead:
        return JobRead.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def list_jobs(self, status: str | None = None, model: str | None = None) -> list[JobRead]:
        params = {k: v for k, v in (("status", status), ("model", model)) if v}
        return [JobRead.model_validate(j) for j in self._pages("/v1/jobs", params)]

    def cancel_job(self, job_id: str) -> JobRead:
        return JobRead.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    # Evaluations --------------------------------------------------------------------------

    def evaluate(
        self,
        model: str,
        versions: list[int],
        dataset_id: str,
        *,
        notify_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationRead:
        """Queue an evaluation of ``versions`` (the first is the baseline) on a dataset; follow
        it with ``wait`` (it is a job of kind evaluate), then ``get_evaluation``."""
        body: dict[str, Any] = {"model": model, "versions": versions, "dataset_id": dataset_id}
        if notify_url is not None:
            body["notify_url"] = notify_url
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/evaluations", json=body, headers=headers)
        return EvaluationRead.model_validate(response.json())

    def get_evaluation(self, evaluation_id: str) -> EvaluationRead:
        response = self._request("GET", f"/v1/evaluations/{evaluation_id}")
        return EvaluationRead.model_validate(response.json())

    def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> JobRead:
        """Follow the job until its final status, calling ``on_progress`` on every change.
        Uses the server-sent event stream, and polling when the stream is unavailable, breaks
        off or stays silent for STREAM_SILENCE_S. Raises :class:`GraftError` (status 0) once
        ``timeout`` seconds have passed without a final status, whatever the stream does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: queue.SimpleQueue[JobRead | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(
            target=self._follow, args=(job_id, events, stop), name="graft-events", daemon=True
        )
        reader.start()
        try:
            while (left := _left(deadline)) is None or left > 0:
                try:
                    item = events.get(timeout=left)
                except queue.Empty:
                    break  # the deadline: one last look, by polling
                if isinstance(item, JobRead):
                    if on_progress:
                        on_progress(item)
                    if item.status in FINAL:
                        return item
                    continue
                if isinstance(item, GraftError) and item.status == 404:
                    raise item
                if item is not None and not isinstance(item, httpx.TransportError | GraftError):
                    raise item
                break  # the stream ended, broke off or is unsupported: poll
        finally:
            stop.set()  # the reader stops at the stream's next line, or its read timeout
        while True:
            job = self._poll(job_id, _left(deadline))
            if on_progress:
                on_progress(job)
            if job.status in FINAL:
                return job
            left = _left(deadline)
            if left is not None and left <= 0:
                raise GraftError(0, f"job {job_id} did not finish within {timeout} s")
            time.sleep(poll_interval if left is None else min(poll_interval, left))

    def _follow(
        self,
        job_id: str,
        events: queue.SimpleQueue[JobRead | BaseException | None],
        stop: threading.Event,
    ) -> None:
        """Put the job's events on ``events`` (in a thread of its own, so that ``wait`` never
        blocks on the stream past its deadline). The last item is None when the stream ends,
        or the exception that ended it."""
        try:
            for job in self._events(job_id, stop):
                events.put(job)
            events.put(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting thread)
            events.put(exc)

    def _events(self, job_id: str, stop: threading.Event | None = None) -> Iterator[JobRead]:
        """The job's events until the stream ends or ``stop`` is set (checked at every line,
        keep-alives included). A stream silent for STREAM_SILENCE_S raises ReadTimeout."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=STREAM_SILENCE_S)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                self._raise(response)
            for line in response.iter_lines():
                if stop is not None and stop.is_set():
                    return
                if line.startswith("data: "):
                    yield JobRead.model_validate_json(line.removeprefix("data: "))

    def _poll(self, job_id: str, left: float | None) -> JobRead:
        """The job now, asked with the client's timeouts, none longer than ``left`` seconds
        (but at least LAST_LOOK_S, for one last look at the deadline)."""
        if left is None:
            return self.get_job(job_id)
        cap = max(left, LAST_LOOK_S)
        limits = self.http.timeout
        timeout = httpx.Timeout(
            connect=min(limits.connect or cap, cap),
            read=min(limits.read or cap, cap),
            write=min(limits.write or cap, cap),
            pool=min(limits.pool or cap, cap),
        )
        response = self._request("GET", f"/v1/jobs/{job_id}", timeout=timeout)
        return JobRead.model_validate(response.json())

    # The API's JSON as it is ---------------------------------------------------------------

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """The API's answer to ``GET path``, decoded but otherwise as it was sent."""
        return self._request("GET", path, params=params or {}).json()

    def list_json(self, path: str, params: dict[str, Any] | None = None) -> list[dict]:
        """Every item of every page of a list (``GET path``), as the API sent them."""
        return list(self._pages(path, params or {}))

    # Helpers --------------------------------------------------------------------------------

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict]:
        cursor = None
        while True:
            page = self._request(
                "GET",
                path,
                params={**params, "limit": 500, **({"cursor": cursor} if cursor else {})},
            )
            body = page.json()
            yield from body["items"]
            cursor = body["next_cursor"]
            if not cursor:
                return

    def _raise(self, response: httpx.Response) -> None:
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text[:200]}
        raise GraftError(response.status_code, problem.get("detail", ""), problem)
