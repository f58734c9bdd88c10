"""The `graft` command's everyday output against a real `graft serve`: tables that never cut an
id, JSON for scripts, downloads that never overwrite a file unasked, problems said once and with
a way out, and deleting models."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch

from devkit import digits as D
from devkit.digits import OLD, register_digits
from engine.architectures import build_model
from tests.support.cli import run_graft, run_graft_in_terminal

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}


def graft(
    server_client, *args: str, columns: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`graft ARGS` with its output piped, as a script runs it (COLUMNS: a terminal's width)."""
    return run_graft(str(server_client.base_url), *args, columns=columns, cwd=cwd)


@pytest.fixture(scope="module")
def digits(server, tmp_path_factory, digit_splits):
    """A model "digits" (a resnet18 with 0-8; its weights untrained: nothing here trains it),
    a dataset with a new label and one with old labels only, and a finished job."""
    client, _, _ = server
    _, held = digit_splits
    weights = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    model = build_model("timm:resnet18", len(OLD))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    assert register_digits(client, weights).status_code == 201
    folders = {str(d): held.of(d)[:4] for d in OLD}
    new = client.post(
        "/v1/datasets",
        files={"archive": ("new.zip", D.zip_image_folder(folders | {"9": held.of(9)[:5]}))},
    ).json()
    old = client.post(
        "/v1/datasets", files={"archive": ("old.zip", D.zip_image_folder(folders))}
    ).json()
    job = client.post("/v1/jobs", json={"model": "digits", "dataset_id": new["id"]}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    deadline = time.monotonic() + 300  # a safety net against a hang, not a measure of speed
    while client.get(f"/v1/jobs/{job['id']}").json()["status"] not in FINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return {"job": job["id"], "new": new["id"], "old": old["id"], "weights": weights}


def test_tables_never_cut_an_id_and_every_list_and_show_prints_the_api_json(server, digits):
    client, _, _ = server
    job_id = digits["job"]
    narrow = graft(client, "job", "list", columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert job_id in narrow.stdout, narrow.stdout  # whole, on one line, in 80 columns
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    piped = graft(client, "job", "list")
    row = next(line for line in piped.stdout.splitlines() if job_id in line)
    assert "cancelled" in row and "digits v1" in row  # piped: one line per job
    assert "digits" in graft(client, "model", "list", columns=40).stdout

    def printed(*args: str) -> object:
        shown = graft(client, *args, "--output", "json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)

    assert printed("job", "list") == client.get("/v1/jobs").json()["items"]
    assert printed("job", "list", "--model", "digits", "--status", "cancelled") == [
        client.get(f"/v1/jobs/{job_id}").json()
    ]
    assert printed("job", "show", job_id) == client.get(f"/v1/jobs/{job_id}").json()
    assert printed("model", "list") == client.get("/v1/models").json()["items"]
    assert printed("model", "show", "digits") == client.get("/v1/models/digits").json()
    assert printed("model", "show", "digits@1") == client.get("/v1/models/digits/versions/1").json()
    assert printed("dataset", "list") == client.get("/v1/datasets").json()["items"]
    dataset = client.get(f"/v1/datasets/{digits['new']}").json()
    assert printed("dataset", "show", digits["new"]) == dataset
    listed = graft(client, "dataset", "list", columns=60)
    assert digits["new"] in listed.stdout and digits["old"] in listed.stdout
    wrong = graft(client, "job", "list", "--output", "yaml")
    assert wrong.returncode == 2


def test_job_list_in_an_80_column_terminal_keeps_words_and_dates_whole(server, digits):
    client, _, _ = server
    shown = run_graft_in_terminal(str(client.base_url), "job", "list", columns=80)
    lines = shown.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, shown
    row = next(line for line in lines if digits["job"] in line)
    assert "cancelled" in row.split(), shown  # the state, whole, on the job's line
    assert re.search(r"\b\d\d-\d\d \d\d:\d\d\b", row), shown


def test_a_download_never_replaces_a_file_unless_asked(server, digits, tmp_path):
    client, _, _ = server
    first = graft(client, "model", "pull", "digits", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "digits-v1.safetensors"
    assert safetensors.torch.load_file(saved)  # named after the model and its version

    mine = tmp_path / "digits-v1.onnx"
    mine.write_bytes(b"my own file")
    refused = graft(client, "model", "pull", "digits@1", "--format", "onnx", cwd=tmp_path)
    assert refused.returncode == 2
    assert "digits-v1.onnx exists" in refused.stderr and "--force" in refused.stderr
    assert mine.read_bytes() == b"my own file"
    again = graft(client, "model", "pull", "digits", cwd=tmp_path)
    assert again.returncode == 2 and "digits-v1.safetensors exists" in again.stderr

    forced = graft(client, "model", "pull", "digits@1", "--format", "onnx", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert mine.read_bytes().startswith(b"\x08")  # an ONNX protobuf now
    named = tmp_path / "named.safetensors"
    named.write_bytes(b"replace me")
    chosen = graft(client, "model", "pull", "digits@1", "-o", str(named))
    assert chosen.returncode == 0 and safetensors.torch.load_file(named)
    folder = tmp_path / "models"
    folder.mkdir()
    into = graft(client, "model", "pull", "digits@1", "--format", "onnx", "-o", str(folder))
    assert into.returncode == 0, into.stderr
    assert (folder / "digits-v1.onnx").read_bytes().startswith(b"\x08")  # named, in the folder
    kept = graft(client, "model", "pull", "digits@1", "--format", "onnx", "-o", str(folder))
    assert kept.returncode == 2 and "digits-v1.onnx exists" in kept.stderr
    missing = graft(client, "model", "pull", "digits@7", "-o", str(tmp_path / "none"))
    assert missing.returncode == 3 and missing.stderr.startswith("error:"), repr(missing.stderr)


def test_a_misspelt_model_is_said_once_with_the_close_match(server, digits):
    client, _, _ = server
    api = client.post("/v1/jobs", json={"model": "digts", "dataset_id": digits["new"]})
    assert api.status_code == 422
    assert api.json()["detail"] == "no model named 'digts'; did you mean 'digits'?"
    assert "did you mean 'digits'" in client.get("/v1/models/digit").json()["detail"]
    assert "did you mean" not in client.get("/v1/models/zebra").json()["detail"]

    submitted = graft(client, "job", "submit", "--model", "digts", "--dataset", digits["new"])
    assert submitted.returncode == 3
    assert submitted.stderr.count("no model named 'digts'") == 1, submitted.stderr
    assert "did you mean 'digits'?" in submitted.stderr
    shown = graft(client, "model", "show", "digitz")
    assert shown.returncode == 3 and shown.stderr.count("did you mean 'digits'?") == 1


def test_a_dataset_of_known_labels_names_the_version_compared_and_the_way_out(server, digits):
    client, _, _ = server
    api = client.post("/v1/jobs", json={"model": "digits", "dataset_id": digits["old"]})
    assert api.status_code == 422
    detail = api.json()["detail"]
    assert "digits version 1" in detail and "base_version" in detail and "new_labels" in detail

    submitted = graft(client, "job", "submit", "--model", "digits", "--dataset", digits["old"])
    assert submitted.returncode == 3
    assert submitted.stderr.count("digits version 1") == 1, submitted.stderr
    # in the CLI's words: its flags, not the API's fields
    assert "--base-version" in submitted.stderr and "--new-label" in submitted.stderr
    assert "base_version" not in submitted.stderr and "new_labels" not in submitted.stderr


def test_model_delete_says_what_it_deleted_and_needs_force_for_a_model_in_use(server, digits):
    client, _, _ = server
    both = graft(client, "model", "delete", "digits@1", "--version", "1")
    assert both.returncode == 2 and "once" in both.stderr
    assert graft(client, "model", "delete", "digits@one").returncode == 2
    assert client.get("/v1/models/digits").status_code == 200  # nothing was deleted

    assert register_digits(client, digits["weights"], name="scratch").status_code == 201
    long = {"epochs": 200, "augmentation": {"views": 64}}  # still running when deleted
    body = {"model": "scratch", "dataset_id": digits["new"], "config": long}
    job = client.post("/v1/jobs", json=body).json()
    in_use = graft(client, "model", "delete", "scratch")
    assert in_use.returncode == 3 and "--force" in in_use.stderr, in_use.stderr
    assert client.get("/v1/models/scratch").status_code == 200
    forced = graft(client, "model", "delete", "scratch", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "deleted model scratch and its 1 version" in forced.stdout
    assert client.get("/v1/models/scratch").status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404

    assert register_digits(client, digits["weights"], name="scratch").status_code == 201
    version = graft(client, "model", "delete", "scratch", "--version", "1")
    assert version.returncode == 0, version.stderr
    assert "deleted scratch v1" in version.stdout
    assert client.get("/v1/models/scratch/versions/1").json()["deleted_at"]
    gone = graft(client, "model", "delete", "scratch@1")
    assert gone.returncode == 3
    url = str(client.base_url)
    asked = run_graft_in_terminal(url, "model", "delete", "scratch", answer="n\n")
    assert "delete model scratch and its 0 versions?" in asked and "nothing deleted" in asked
    assert client.get("/v1/models/scratch").status_code == 200
    last = run_graft_in_terminal(url, "model", "delete", "scratch", answer="y\n")
    assert "deleted model scratch and its 0 versions (and the records of 1 deleted before)" in (
        " ".join(last.split())
    ), last
    assert client.get("/v1/models/scratch").status_code == 404
