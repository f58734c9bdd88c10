"""The API's importer: a thread that claims datasets registered by reference and copies them
in, each import in a thread of its own (at most ``MAX_RUNNING`` at once), renewing its lease
and writing its progress every second (see app.imports for the claim and its fence)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading

from app import s3uri
from app.archives import archive_limits, pack_images
from app.datasets import DatasetStatus
from app.import_sources import (
    Copied,
    Copier,
    ImportFailed,
    Stopped,
    download,
    list_prefix,
    max_manifest_bytes,
    parse_manifest,
)
from app.imports import MAX_RUNNING, POLL_S, Lease, claim, client_of, progress
from core import scratch
from core.db import utcnow
from core.settings import Settings
from core.storage import open_storage

log = logging.getLogger(__name__)


class Run:
    """One claimed import, from listing to the stored tar."""

    def __init__(self, settings: Settings, lease: Lease, source: dict[str, str]) -> None:
        self.settings, self.lease, self.source = settings, lease, source
        self.token = secrets.token_hex(4)
        self.folder = settings.tmp_dir / f"import-{lease.dataset_id}-{self.token}"
        self.stop = threading.Event()
        self.lost = threading.Event()  # the claim no longer holds: nothing more is written
        self.state = progress(0, None, "listing the images")
        self.copier: Copier | None = None
        self.skipped = 0  # files rejected before copying (by their name, size or line)
        self.status: str | None = None  # what the import ended as, if it ended

    def __call__(self) -> None:
        heartbeat = threading.Thread(target=self._heartbeat, name="import-lease", daemon=True)
        self._remove_earlier_attempts()
        self.folder.mkdir(parents=True)
        held = scratch.hold(self.folder)  # the janitor leaves it alone while this runs
        heartbeat.start()
        try:
            copied = self._copy()
            self._store(copied)
        except ImportFailed as exc:
            log.info("import of dataset %s failed: %s", self.lease.dataset_id, exc.message)
            self._finish(
                status=DatasetStatus.FAILED,
                error={"code": exc.code, "message": exc.message},
                progress={**self._progress(), "message": "failed"},
            )
        except Stopped:
            log.info("import of dataset %s stopped", self.lease.dataset_id)
        except Exception as exc:
            log.exception("import of dataset %s failed", self.lease.dataset_id)
            self._finish(
                status=DatasetStatus.FAILED,
                error={"code": "import_error", "message": f"the import failed: {exc}"},
                progress={**self._progress(), "message": "failed"},
            )
        finally:
            self.stop.set()
            heartbeat.join()
            shutil.rmtree(self.folder, ignore_errors=True)
            os.close(held)
        if self.status is None and not self.lost.is_set():  # the server is stopping
            self.lease.write(
                lease_expires_at=None, progress=progress(0, None, "waiting to be copied again")
            )

    def _remove_earlier_attempts(self) -> None:
        """Folders of an attempt whose process died: this claim is the only one now."""
        for stale in self.settings.tmp_dir.glob(f"import-{self.lease.dataset_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _progress(self) -> dict:
        if self.copier is not None and self.state["total"] is not None:
            done = self.skipped + self.copier.done
            return progress(done, self.state["total"], "copying the images")
        return self.state

    def _heartbeat(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                held = self.lease.write(progress=self._progress())
            except Exception:  # the database is away: held until the lease runs out
                log.warning("could not renew the import's lease", exc_info=True)
                held = utcnow() < self.lease.expires
            if not held:
                self.lost.set()
                self.stop.set()

    def _finish(self, **values: object) -> bool:
        if self.lost.is_set() or not self.lease.write(lease_expires_at=None, **values):
            return False
        self.status = str(values["status"])
        return True

    def _copy(self) -> Copied:
        limits, client = archive_limits(self.settings), client_of(self.settings)
        allowed = self.settings.import_bucket_names
        uri = s3uri.parse(self.source["uri"], prefix=self.source["kind"] == "prefix")
        try:
            s3uri.check_allowed(uri, allowed)
        except PermissionError as exc:
            raise ImportFailed("not_allowed", str(exc)) from None

        def listed(count: int) -> None:
            if self.stop.is_set():
                raise Stopped()
            self.state = progress(count, None, f"listing the images ({count} so far)")

        if self.source["kind"] == "prefix":
            entries, rejected = self._guarded(lambda: list_prefix(client, uri, limits, listed))
        else:
            manifest = self.folder / "manifest.csv"
            cap = max_manifest_bytes(limits)
            if not self._guarded(lambda: download(client, uri.bucket, uri.key, manifest, cap)):
                raise ImportFailed("too_large", f"the manifest is larger than {cap} bytes")
            entries, rejected = parse_manifest(manifest, limits, allowed)
            manifest.unlink()
        if self.stop.is_set():
            raise Stopped()
        self.skipped = len(rejected)
        self.state = progress(self.skipped, len(entries) + self.skipped, "copying the images")
        images = self.folder / "images"
        images.mkdir()
        self.copier = Copier(client, limits, images, self.settings.import_threads, self.stop)
        copied = self.copier.run(entries)
        copied.rejected[:0] = rejected
        return copied

    def _guarded(self, read):  # noqa: ANN001, ANN202 (a reading of the source, or why not)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return read()
        except ClientError as exc:
            raise ImportFailed("source_unreadable", f"{self.source['uri']}: {exc}") from None
        except BotoCoreError as exc:
            raise ImportFailed("source_unreachable", f"{self.source['uri']}: {exc}") from None

    def _store(self, copied: Copied) -> None:
        total = len(copied.images) + len(copied.rejected)
        if not copied.images:
            shown = "; ".join(f"{r['path']}: {r['reason']}" for r in copied.rejected[:3])
            raise ImportFailed(
                "no_images",
                f"no usable image in {self.source['uri']}; expected <label>/<image> objects"
                + (f" ({shown})" if shown else ""),
            )
        self.state = progress(total, total, "storing the images", fraction=0.97)
        self.copier = None
        tar = self.folder / "images.tar"
        pack_images(copied.images, tar)
        if self.stop.is_set():
            raise Stopped()
        storage = open_storage(self.settings)
        key = f"datasets/{self.lease.dataset_id}/images-{self.token}.tar"
        stored = storage.put_file(key, tar)
        labels: dict[str, int] = {}
        for label, _, _ in copied.images:
            labels[label] = labels.get(label, 0) + 1
        ready = self._finish(
            status=DatasetStatus.READY,
            labels=dict(sorted(labels.items())),
            num_images=len(copied.images),
            rejected=copied.rejected,
            sha256=stored.sha256,
            storage_key=stored.key,
            size_bytes=stored.size_bytes,
            progress=progress(total, total, "ready", fraction=1.0),
            error=None,
        )
        if not ready:  # deleted or taken over meanwhile: this copy is nobody's
            storage.delete(key)
            raise Stopped()
        log.info("dataset %s imported: %d images", self.lease.dataset_id, len(copied.images))


class Importer:
    """Claims imports (new ones, and those whose copier died) and runs them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="importer", daemon=True)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Look for imports now (one was just registered)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming and give up the running imports; their leases expire, and the next
        importer starts them again."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            runs = list(self.running.values())
        for run in runs:
            run.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def run_once(self) -> int:
        """Claim what this process has room for; returns how many imports were started."""
        started = 0
        while not self._closing.is_set():
            with self._lock:
                if len(self.running) >= MAX_RUNNING:
                    break
                claimed = claim(self.settings, set(self.running))
                if claimed is None:
                    break
                lease, source = claimed
                run = Run(self.settings, lease, source)
                self.running[lease.dataset_id] = run
            thread = threading.Thread(target=self._run, args=(run,), name="import", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
            started += 1
        return started

    def _run(self, run: Run) -> None:
        try:
            run()
        finally:
            with self._lock:
                self.running.pop(run.lease.dataset_id, None)
            self._wake.set()  # room for another

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.run_once()
            except Exception:
                log.warning("looking for imports failed", exc_info=True)
            self._wake.wait(POLL_S)
            self._wake.clear()
