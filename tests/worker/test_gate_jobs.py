"""The gate over HTTP with the real pipeline: settings per model and per job, the held status,
and label hygiene before any training."""

from __future__ import annotations

import json

from devkit.digits import OLD, register_digits
from tests.app.test_api import assert_problem
from tests.worker.test_retention import run, upload


def test_a_train_val_layout_is_refused_before_training_unless_named_on_purpose(
    client, model, digit_splits
):
    _, held = digit_splits
    split = {f"train/{d}": held.of(d)[:6] for d in range(10)} | {
        f"val/{d}": held.of(d)[6:8] for d in range(10)
    }
    dataset = upload(client, split)
    assert dataset["labels"] == {"train": 60, "val": 20}  # what the archive says, as it is
    refused = client.post("/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]})
    problem = assert_problem(refused, 422, field="dataset_id", says="'train', 'val'")
    assert "<label>/<image>" in problem["detail"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing queued
    named = {"model": "digits", "dataset_id": dataset["id"], "new_labels": ["train", "val"]}
    assert client.post("/v1/jobs", json=named).status_code == 202


def test_gate_settings_live_on_the_model_and_a_job_may_override_them(client, base_weights):
    strict = json.dumps({"min_retention": 0.99, "margin": 0.01})
    response = register_digits(client, base_weights, gate=strict)
    assert response.status_code == 201, response.text
    gate = client.get("/v1/models/digits").json()["gate"]
    assert gate["min_retention"] == 0.99 and gate["margin"] == 0.01 and gate["min_images"] == 20
    assert gate["alpha"] == 0.05  # a default, shown under the model's own settings

    changed = client.put("/v1/models/digits/gate", json={"label_max_drop": 0.2})
    assert changed.status_code == 200, changed.text
    assert changed.json()["gate"]["label_max_drop"] == 0.2
    assert changed.json()["gate"]["min_retention"] == 0.98  # a PUT replaces the settings
    assert_problem(client.put("/v1/models/digits/gate", json={"margin": 2}), 422)
    assert_problem(client.put("/v1/models/digits/gate", json={"speed": 1}), 422)
    assert_problem(client.put("/v1/models/nope/gate", json={}), 404)
    bad = register_digits(client, base_weights, name="other", gate="{not json")
    assert_problem(bad, 422, field="gate")


def test_a_label_too_small_to_judge_holds_the_version_and_says_what_would_decide_it(
    client, settings, model, digit_splits
):
    _, held = digit_splits
    one_shot = upload(client, {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:1]})
    job = run(client, settings, {"model": "digits", "dataset_id": one_shot["id"]})
    final = job["final"]
    gate = final["metrics"]["gate"]
    assert gate["decision"] == "held" and final["result"]["gate"] == "held"
    assert gate["checks"]["new_labels"]["9"]["verdict"] == "unclear"
    assert final["metrics"]["measurement"]["few_shot"] == {"9": 1}
    assert "new label '9' cannot be judged" in gate["reason"]
    assert any("add images of '9'" in step for step in gate["next_steps"])
    assert any(w.startswith("version 2 is held") for w in final["warnings"])
    assert client.get("/v1/models/digits/versions/2").json()["status"] == "held"
    assert client.get("/v1/models/digits").json()["latest_version"] == 1
    promoted = client.post("/v1/models/digits/versions/2/promote", json={"reason": "seen it"})
    assert promoted.json()["promotions"][0]["previous_status"] == "held"


def test_images_filed_under_the_wrong_label_are_named_with_the_label_they_look_like(
    client, settings, model, digit_splits
):
    _, held = digit_splits
    folders = {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:10]}
    strays = held.of(3)[40:44]  # four 3s filed as 5s
    folders["5"] = folders["5"] + strays
    job = run(client, settings, {"model": "digits", "dataset_id": upload(client, folders)["id"]})
    issues = job["final"]["metrics"]["label_issues"]
    flagged = {(i["label"], i["looks_like"]) for i in issues["images"]}
    assert issues["count"] >= 3 and ("5", "3") in flagged
    strays_flagged = [i for i in issues["images"] if i["label"] == "5" and i["looks_like"] == "3"]
    assert len(strays_flagged) >= 3 and all(i["file"].startswith("5/") for i in strays_flagged)
    assert any("look mislabeled" in w for w in job["final"]["warnings"])
    report = client.get(f"/v1/jobs/{job['id']}/report").text
    assert 'id="label-issues"' in report
