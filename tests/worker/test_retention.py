"""Retention you can trust, over HTTP with the real pipeline: reference sets, the unverified
status, promotion on purpose, and what every figure rests on."""

from __future__ import annotations

import safetensors.torch
import timm
import torch

from devkit import digits as D
from devkit.digits import OLD, register_digits
from tests.app.test_api import assert_problem
from worker import pipeline


def upload(client, folders) -> dict:
    response = client.post(
        "/v1/datasets", files={"archive": ("d.zip", D.zip_image_folder(folders))}
    )
    assert response.status_code == 201, response.text
    return response.json()


def run(client, settings, body) -> dict:
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    pipeline.run_job(submitted.json()["id"], settings)
    job = client.get(f"/v1/jobs/{submitted.json()['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    return submitted.json() | {"final": job}


def held_out_old_accuracy(client, name, version, held) -> float:
    weights = client.get(f"/v1/models/{name}/versions/{version}/artifact").content
    state = safetensors.torch.load(weights)
    model = timm.create_model("resnet18", num_classes=state["fc.weight"].shape[0])
    model.load_state_dict(state)
    images = [im for d in OLD for im in held.of(d)[60:]]
    y = torch.tensor([d for d in OLD for _ in held.of(d)[60:]])
    with torch.inference_mode():
        return (model.eval()(D.tensors(images)).argmax(1) == y).float().mean().item()


def test_new_label_images_alone_give_an_unverified_version_that_does_not_become_latest(
    client, settings, model, digit_splits
):
    _, held = digit_splits
    nines = upload(client, {"9": held.of(9)[:10]})
    job = run(client, settings, {"model": "digits", "dataset_id": nines["id"]})
    [warning] = job["warnings"]  # said at submission, in the 202 answer
    assert "unverified" in warning and "/v1/models/digits/versions/1/reference" in warning

    final = job["final"]
    assert final["result"] == {"model": "digits", "version": 2, "gate": "unverified"}
    gate = final["metrics"]["gate"]
    assert gate["decision"] == "unverified" and gate["evidence"] == "none" and gate["n"] == 0
    assert any("version 2 is unverified" in w for w in final["warnings"])
    assert client.get("/v1/models/digits/versions/2").json()["status"] == "unverified"
    assert client.get("/v1/models/digits").json()["latest_version"] == 1

    # on purpose, recorded; then rolled back
    promoted = client.post("/v1/models/digits/versions/2/promote", json={"reason": "looks fine"})
    assert promoted.status_code == 200, promoted.text
    body = promoted.json()
    assert body["latest_version"] == 2
    assert body["promotions"][0] | {"created_at": None} == {
        "version": 2,
        "previous_version": 1,
        "previous_status": "unverified",
        "actor": "local",
        "reason": "looks fine",
        "created_at": None,
    }
    assert client.get("/v1/models/digits/versions/2").json()["status"] == "promoted"
    back = client.post("/v1/models/digits/versions/1/promote").json()
    assert back["latest_version"] == 1 and len(back["promotions"]) == 2
    assert back["promotions"][0]["previous_version"] == 2
    assert_problem(client.post("/v1/models/digits/versions/7/promote"), 404)


def test_a_reference_set_makes_new_label_uploads_measured_gated_and_safe(
    client, settings, base_weights, digit_splits
):
    _, held = digit_splits
    memory = upload(client, {str(d): held.of(d)[:20] for d in OLD})
    registered = register_digits(client, base_weights, reference=memory["id"])
    assert registered.status_code == 201, registered.text
    assert registered.json()["reference"] == {str(d): 20 for d in OLD}
    # the version keeps its own copies: the dataset can go
    assert client.delete(f"/v1/datasets/{memory['id']}").status_code == 204

    nines = upload(client, {"9": held.of(9)[:10]})
    job = run(client, settings, {"model": "digits", "dataset_id": nines["id"]})
    assert job["warnings"] == [] and job["config"]["old_rows"] == "trainable"
    m = job["final"]["metrics"]
    assert m["old_classes"]["n"] == 180 and m["new_classes"]["n"] == 10
    assert m["measurement"]["measured"]["from_reference"] == 180
    for figure in ("accuracy_before", "accuracy_after", "retention", "prediction_agreement"):
        low, high = m["old_classes"]["ci95"][figure]
        assert low <= m["old_classes"][figure] <= high
    assert m["new_classes"]["ci95"]["accuracy"][0] < m["new_classes"]["accuracy"]
    gate = m["gate"]
    assert gate["decision"] in ("promoted", "held", "rejected")
    assert gate["evidence"] in ("strong", "within margin", "weak")
    assert gate["checks"]["new_labels"]["9"]["verdict"] == "learned"
    assert gate["n"] == 180 and set(gate["paired"]) == {
        "both_right",
        "lost",
        "gained",
        "both_wrong",
    }
    assert job["final"]["result"]["gate"] == gate["decision"]

    v2 = client.get("/v1/models/digits/versions/2").json()
    assert v2["status"] == gate["decision"]
    assert v2["reference"] == {str(d): 20 for d in OLD} | {"9": 10}
    summary = client.get("/v1/models/digits").json()["versions"]
    assert [v["reference_images"] for v in summary] == [180, 190]
    # the promise, checked on images no job saw
    drop = held_out_old_accuracy(client, "digits", 1, held) - held_out_old_accuracy(
        client, "digits", 2, held
    )
    assert drop <= 0.015

    # a second job inherits v1's set, and the cached features spare reading it
    fours = upload(client, {"4": held.of(4)[20:30], "9": held.of(9)[10:20]})
    more = run(client, settings, {"model": "digits", "base_version": 1, "dataset_id": fours["id"]})
    assert more["final"]["metrics"]["feature_cache"]["reference_cached"] == 180
    assert more["final"]["metrics"]["old_classes"]["n"] == 190

    # a job on v2 measures v2's remembered images with the fold layers that never saw them
    rotated = upload(client, {"9r": [im.rotate(180) for im in held.of(9)[20:30]]})
    third = run(
        client, settings, {"model": "digits", "base_version": 2, "dataset_id": rotated["id"]}
    )
    measured = third["final"]["metrics"]["measurement"]
    assert measured["base_fold_layers"] is True
    # every remembered image has a fold of v2 (ten nines, five folds): all are measured
    assert measured["seen_by_base"] == 0 and third["final"]["metrics"]["old_classes"]["n"] == 190


def test_adding_to_a_reference_set(client, settings, model, digit_splits):
    _, held = digit_splits
    assert client.get("/v1/models/digits/versions/1").json()["reference"] == {}
    first = upload(client, {"0": held.of(0)[:5], "1": held.of(1)[:5], "cat": held.of(3)[:2]})
    answer = client.post("/v1/models/digits/versions/1/reference", json={"dataset_id": first["id"]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "name": "digits",
        "version": 1,
        "reference": {"0": 5, "1": 5},
        "added": {"0": 5, "1": 5},
        "ignored_labels": ["cat"],
    }
    # the same images again add nothing; new ones are capped per label
    again = client.post("/v1/models/digits/versions/1/reference", json={"dataset_id": first["id"]})
    assert again.json()["added"] == {} and again.json()["reference"] == {"0": 5, "1": 5}
    capped = settings.model_copy(update={"reference_per_label": 8})
    many = upload(client, {"0": held.of(0)[5:25]})
    client.app.state.settings = capped
    answer = client.post("/v1/models/digits/versions/1/reference", json={"dataset_id": many["id"]})
    assert answer.json()["reference"] == {"0": 8, "1": 5}
    assert client.get("/v1/models/digits").json()["versions"][0]["reference_images"] == 13
    manifests = list((settings.data_dir / "artifacts").rglob("reference-*.json"))
    assert len(manifests) == 1  # each change replaced the manifest; none left behind


def test_bad_reference_requests_are_4xx_and_change_nothing(client, base_weights, digit_splits):
    _, held = digit_splits
    strangers = upload(client, {"0": held.of(0)[:3], "9": held.of(9)[:3]})
    response = register_digits(client, base_weights, reference=strangers["id"])
    assert_problem(response, 422, field="reference_dataset_id", says="'9'")
    assert client.get("/v1/models/digits").status_code == 404
    assert register_digits(client, base_weights).status_code == 201
    url = "/v1/models/digits/versions/1/reference"
    assert_problem(client.post(url, json={"dataset_id": "nope"}), 422, field="dataset_id")
    only_new = upload(client, {"9": held.of(9)[:3]})
    assert_problem(client.post(url, json={"dataset_id": only_new["id"]}), 422, field="dataset_id")
    assert_problem(client.post(url, json={}), 422)
    assert_problem(
        client.post("/v1/models/digits/versions/5/reference", json={"dataset_id": "x"}), 404
    )
    assert client.get("/v1/models/digits/versions/1").json()["reference"] == {}
