"""What killed requests and workers leave behind is removed once nothing owns it and its grace
has passed; nothing a row owns is ever touched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from core import janitor
from core.db import session_scope, utcnow
from core.models import Dataset, Model, new_id
from core.storage import open_storage
from devkit import digits as D
from devkit.digits import digits_archive
from worker import pipeline


@pytest.fixture()
def leftovers(settings, client, model, digit_splits, tmp_path):
    """A model, a dataset and a queued job, and the debris of killed uploads and attempts."""
    archive = digits_archive(digit_splits[1], old_per_class=10)
    dataset = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
    job_id = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    job_id = job_id.json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        model_id = s.scalar(select(Model.id))
    storage = open_storage(settings)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    orphans = [
        f"datasets/{new_id()}/images.tar",  # stored, then the API died before the row
        f"models/{model_id}/{new_id()}/model.safetensors",  # a worker died before its finish
        f"models/{model_id}/reference/{hashlib.sha256(b'lost').hexdigest()}",
    ]
    for key in orphans:
        storage.put_file(key, blob)
    incoming = settings.data_dir / "artifacts" / "datasets" / ".incoming-abc"
    incoming.write_bytes(b"half a file")
    folders = [
        settings.tmp_dir / "dataset-killed",  # an upload cut off while unpacking
        settings.tmp_dir / f"job-{job_id}-killed",  # an attempt killed mid-job
        settings.tmp_dir / "tmpregistration",
    ]
    for folder in folders:
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "0.png").write_bytes(b"png")
    return job_id, orphans, folders


def stored(settings) -> set[str]:
    return {key for key, _ in open_storage(settings).list_objects("")}


@pytest.mark.fault("the API is killed mid-upload")
def test_leftovers_go_after_their_grace_and_owned_files_stay(settings, client, leftovers, observed):
    job_id, orphans, folders = leftovers
    before = stored(settings)

    fresh = janitor.clean(settings)  # within the grace: only the job's folder (not running) goes
    assert (fresh.folders, fresh.objects) == (1, 0)
    assert not folders[1].exists() and folders[0].exists()

    cleaned = janitor.clean(settings.model_copy(update={"orphan_grace_s": 0}))
    assert (cleaned.folders, cleaned.objects) == (2, len(orphans) + 1)
    assert list(settings.tmp_dir.iterdir()) == []
    assert stored(settings) == before - set(orphans) - {"datasets/.incoming-abc"}
    observed(
        f"within the grace nothing owned or young went; past it {cleaned.folders} folders and "
        f"{cleaned.objects} unowned objects went, every owned file stayed"
    )

    # everything owned still works: the version downloads, the dataset trains a new version
    assert client.get("/v1/models/digits/versions/1/artifact").status_code == 200
    pipeline.run_job(job_id, settings)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    after = janitor.clean(settings.model_copy(update={"orphan_grace_s": 0}))
    assert (after.folders, after.objects) == (0, 0)


def test_decoded_pixels_go_once_their_dataset_is_deleted(settings, leftovers):
    """An API that died between deleting a dataset and removing its decoded pixels (or pixels
    of a dataset never recorded) leaves folders the next pass removes; a live one's stay."""
    with session_scope(settings.resolved_database_url) as s:
        dataset_id = s.scalar(select(Dataset.id))
    live, unknown = settings.decoded_dir / dataset_id, settings.decoded_dir / new_id()
    for folder in (live, unknown):
        folder.mkdir(parents=True)
        (folder / "pixels.u8").write_bytes(bytes(3 * 32 * 32))
    killed, writing = live / "a.1234.partial", live / "b.5678.partial"
    for partial in (killed, writing):
        partial.write_bytes(bytes(3 * 32 * 32))
    an_hour_ago = time.time() - 3600  # a pass killed before the grace
    os.utime(killed, (an_hour_ago, an_hour_ago))
    janitor.clean(settings.model_copy(update={"orphan_grace_s": 600}))
    assert live.exists() and not unknown.exists()
    assert sorted(p.name for p in live.iterdir()) == ["b.5678.partial", "pixels.u8"]
    with session_scope(settings.resolved_database_url) as s:
        s.get(Dataset, dataset_id).deleted_at = utcnow()
    janitor.clean(settings)
    assert not live.exists()


def test_a_running_jobs_folder_is_left_alone(settings, leftovers):
    job_id, _, folders = leftovers
    assert pipeline.claim_job(settings, job_id) == 1
    janitor.clean(settings.model_copy(update={"orphan_grace_s": 0}))
    assert folders[1].exists()


def test_an_upload_still_unpacking_survives_a_janitor_pass_past_its_grace(settings, client):
    """Past any grace (0 s here), a folder a live process holds is never removed: its writer,
    not the times of its files, says it is alive."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (10, 200, 16, 16, 3), dtype=np.uint8)  # 2,000 distinct images
    archive = D.zip_image_folder(
        {str(d): [Image.fromarray(pixels) for pixels in noise[d]] for d in range(10)}
    )
    answer: dict = {}
    upload = threading.Thread(
        target=lambda: answer.update(
            r=client.post("/v1/datasets", files={"archive": ("big.zip", archive)})
        )
    )
    upload.start()
    deadline = time.monotonic() + 120
    while not [p for p in settings.tmp_dir.glob("dataset-*/images/*")]:
        assert time.monotonic() < deadline and upload.is_alive()
        time.sleep(0.005)
    passes = 0
    while upload.is_alive():  # every pass treats everything as past its grace
        janitor.clean(settings.model_copy(update={"orphan_grace_s": 0}))
        passes += 1
    upload.join()
    assert passes >= 1
    assert answer["r"].status_code == 201, answer["r"].text
    assert answer["r"].json()["num_images"] == 2000
    assert list(settings.tmp_dir.iterdir()) == []


@pytest.mark.fault("the API is killed mid-upload")
def test_the_folder_of_a_killed_writer_goes_at_the_next_pass(settings, observed):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from core.scratch import scratch\n"
        "with scratch(Path(sys.argv[1]), prefix='dataset-') as folder:\n"
        "    (folder / 'a' / 'b').mkdir(parents=True)\n"
        "    print(folder, flush=True)\n"
        "    time.sleep(300)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(settings.tmp_dir)], stdout=subprocess.PIPE, text=True
    )
    folder = Path(writer.stdout.readline().strip())
    past_grace = settings.model_copy(update={"orphan_grace_s": 0})
    janitor.clean(past_grace)
    assert folder.is_dir()  # held
    writer.kill()
    writer.wait()
    janitor.clean(past_grace)
    assert not folder.exists()
    observed("a writer's folder past its grace stayed while it lived; gone the pass after kill -9")
