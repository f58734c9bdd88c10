"""The `graft` command line against a real server, as a user types it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import safetensors
import torch

from devkit import digits as D
from devkit.digits import OLD, register_digits
from tests.support.cli import run_graft

pytestmark = pytest.mark.slow


def graft(
    server_client, *args: str, url: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return run_graft(url or str(server_client.base_url), *args, columns=120, cwd=cwd)


def test_from_a_folder_of_images_to_a_pulled_model_with_the_cli_alone(
    server, base_weights, digit_splits, tmp_path
):
    client, _, _ = server
    _, held = digit_splits
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([str(d) for d in OLD]))
    prep = tmp_path / "prep.json"
    prep.write_text(json.dumps(D.PREP.to_dict()))
    pushed = graft(
        client,
        "model",
        "push",
        "digits",
        "--weights",
        str(base_weights),
        "--arch",
        "timm:resnet18",
        "--labels",
        str(labels),
        "--preprocessing",
        str(prep),
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "registered digits v1" in pushed.stdout

    folder = D.write_image_folder(
        tmp_path / "images", {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:15]}
    )
    (folder / "9" / "notes.txt").write_text("not an image")
    dataset = graft(client, "dataset", "push", str(folder))
    assert dataset.returncode == 0, dataset.stderr
    dataset_id = dataset.stdout.strip().splitlines()[-1]
    assert "skipped 9/notes.txt" in dataset.stderr
    assert client.get(f"/v1/datasets/{dataset_id}").json()["name"] == "images"  # its folder's

    watched = graft(
        client,
        "job",
        "submit",
        "--model",
        "digits",
        "--dataset",
        dataset_id,
        "--config",
        '{"augmentation": {"views": 4}}',
        "--watch",
    )
    assert watched.returncode == 0, watched.stderr
    assert "old-class accuracy after" in watched.stdout and "new-class accuracy" in watched.stdout
    assert "new-class calibration" in watched.stdout
    assert "digits v2" in watched.stdout

    pulled = graft(
        client, "model", "pull", "digits@2", "--format", "onnx", "-o", str(tmp_path / "d.onnx")
    )
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "d.onnx").stat().st_size > 1000 and "sha256 verified" in pulled.stdout
    latest = graft(client, "model", "pull", "digits", "-o", str(tmp_path / "d.safetensors"))
    assert latest.returncode == 0, latest.stderr
    latest_version = client.get("/v1/models/digits").json()["latest_version"]  # promoted one
    with safetensors.safe_open(str(tmp_path / "d.safetensors"), framework="pt") as f:
        expected = client.get(f"/v1/models/digits/versions/{latest_version}").json()["labels"]
        assert json.loads(f.metadata()["labels"]) == expected

    scripted = graft(client, "model", "pull", "digits@2", "--format", "torchscript", cwd=tmp_path)
    assert scripted.returncode == 0, scripted.stderr
    extra = {"graft.json": ""}
    torch.jit.load(tmp_path / "digits-v2.torchscript.pt", _extra_files=extra)
    assert json.loads(extra["graft.json"])["labels"] == [str(d) for d in OLD] + ["9"]

    # HEAD and a resumed download, through the real server
    url = "/v1/models/digits/versions/2/artifact?format=onnx"
    whole = (tmp_path / "d.onnx").read_bytes()
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(whole)
    assert head.headers["etag"] == f'"{hashlib.sha256(whole).hexdigest()}"'
    cut = len(whole) // 2
    rest = client.get(url, headers={"Range": f"bytes={cut}-", "If-Range": head.headers["etag"]})
    assert rest.status_code == 206 and whole[:cut] + rest.content == whole

    # v1 against v2, on held-out scans no job saw
    test = D.write_image_folder(tmp_path / "test", {str(d): held.of(d)[20:] for d in range(10)})
    test_id = graft(client, "dataset", "push", str(test)).stdout.strip().splitlines()[-1]
    evaluate = ["eval", "--model", "digits", "--versions", "1,2", "--dataset", test_id]
    evaluated = graft(client, *evaluate, "--watch")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "submitted evaluation" in evaluated.stderr
    assert "v1 → v2" in evaluated.stdout and "/report" in evaluated.stdout
    assert "more accurate" in evaluated.stdout or "no significant difference" in evaluated.stdout
    queued = graft(client, *evaluate)  # without --watch: its id, for scripts
    evaluation_id = queued.stdout.strip()
    assert queued.returncode == 0 and len(evaluation_id) == 26
    bad = graft(client, "eval", "--model", "digits", "--versions", "1,x", "--dataset", test_id)
    assert bad.returncode == 2 and "--versions takes numbers" in bad.stderr

    listed = graft(client, "job", "list")
    assert listed.returncode == 0, listed.stderr
    # the job's state is what it made: the version and the gate's outcome
    assert re.search(r"\bv2 (promoted|unverified|rejected|held)\b", listed.stdout), listed.stdout
    assert f"{evaluation_id} " in listed.stdout and "evaluates v1, v2" in listed.stdout
    shown = graft(client, "model", "show", "digits")
    assert shown.returncode == 0 and f"{latest_version} (latest)" in shown.stdout


def test_exit_codes_scripts_can_rely_on(server, tmp_path, base_weights):
    client, _, _ = server
    refused = graft(
        client,
        "model",
        "push",
        "x",
        "--weights",
        str(base_weights),
        "--arch",
        "timm:resnet81",
        "--labels",
        "a,b",
    )
    assert refused.returncode == 3 and "close matches" in refused.stderr
    missing = graft(client, "job", "show", "nope")
    assert missing.returncode == 3
    unreachable = graft(client, "model", "list", url="http://127.0.0.1:9")
    assert unreachable.returncode == 4 and "cannot reach" in unreachable.stderr
    usage = graft(client, "job", "submit")
    assert usage.returncode == 2


def test_new_label_images_alone_with_the_cli_a_reference_set_and_a_promotion(
    server, base_weights, digit_splits, tmp_path
):
    client, _, _ = server
    _, held = digit_splits
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([str(d) for d in OLD]))
    push = ["--weights", str(base_weights), "--arch", "timm:resnet18", "--labels", str(labels)]
    memory = D.write_image_folder(tmp_path / "memory", {str(d): held.of(d)[:20] for d in OLD})
    nines = D.write_image_folder(tmp_path / "nines", {"9": held.of(9)[:10]})
    prep = tmp_path / "prep.json"
    prep.write_text(json.dumps(D.PREP.to_dict()))
    push += ["--preprocessing", str(prep)]
    assert graft(client, "model", "push", "forgetful", *push).returncode == 0
    nines_id = graft(client, "dataset", "push", str(nines)).stdout.strip().splitlines()[-1]

    # no old-label image anywhere: warned at once, stored as unverified, not made the latest
    watched = graft(
        client, "job", "submit", "--model", "forgetful", "--dataset", nines_id, "--watch"
    )
    assert watched.returncode == 0, watched.stderr
    assert "warning: retention cannot be measured" in watched.stderr
    assert "unverified" in watched.stdout
    shown = graft(client, "model", "show", "forgetful")
    assert "1 (latest)" in shown.stdout and "unverified" in shown.stdout
    promoted = graft(client, "model", "promote", "forgetful@2", "--reason", "checked by hand")
    assert promoted.returncode == 0 and "latest is v2" in promoted.stdout
    assert "done by local" in promoted.stdout
    assert "2 (latest)" in graft(client, "model", "show", "forgetful").stdout

    # with a reference set: measured, and its evidence shown
    memory_id = graft(client, "dataset", "push", str(memory)).stdout.strip().splitlines()[-1]
    pushed = graft(client, "model", "push", "careful", *push, "--reference", memory_id)
    assert pushed.returncode == 0 and "reference set of 180 images" in pushed.stdout
    watched = graft(client, "job", "submit", "--model", "careful", "--dataset", nines_id, "--watch")
    assert watched.returncode == 0, watched.stderr
    assert "warning" not in watched.stderr
    assert "n=180" in watched.stdout and "180 from the reference set" in watched.stdout
    assert "McNemar" in watched.stdout
    decision = next(line for line in watched.stdout.splitlines() if "│ decision" in line)
    assert any(word in decision for word in ("evidence", "within margin")), decision
    version = graft(client, "model", "show", "careful@2")
    assert version.returncode == 0 and "reference set" in version.stdout
    rows = [[c for c in line.split() if c not in "│┃"] for line in version.stdout.splitlines()]
    assert ["9", "10"] in rows  # the reference set: the job's own images of the new label

    added = graft(client, "model", "reference", "forgetful@1", "--dataset", memory_id)
    assert added.returncode == 0, added.stderr
    assert "forgetful v1 reference set" in added.stdout
    bad = graft(client, "model", "reference", "forgetful@one", "--dataset", memory_id)
    assert bad.returncode == 2


def test_the_gate_settings_of_a_model_are_shown_and_set_from_the_cli(server, base_weights):
    client, _, _ = server
    assert register_digits(client, base_weights, name="gated").status_code == 201
    shown = graft(client, "model", "gate", "gated")
    assert shown.returncode == 0, shown.stderr
    rows = {
        cells[1].strip(): cells[2].strip()
        for cells in (line.split("│") for line in shown.stdout.splitlines())
        if len(cells) >= 4
    }
    assert rows["min_retention"] == "0.98" and rows["margin"] == "0.03"
    changed = graft(client, "model", "gate", "gated", "--min-retention", "0.99")
    assert changed.returncode == 0, changed.stderr
    assert client.get("/v1/models/gated").json()["gate"]["min_retention"] == 0.99
    refused = graft(client, "model", "gate", "gated", "--margin", "3")
    assert refused.returncode == 3 and "margin" in refused.stderr
