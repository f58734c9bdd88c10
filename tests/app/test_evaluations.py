"""Evaluations over HTTP: a real model, a real version grown from it, real held-out scans."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from devkit import digits as D
from devkit.digits import OLD
from tests.app.test_api import assert_problem
from worker import pipeline


@pytest.fixture()
def lineage(client, grown_model, digit_splits):
    """digits v1 (0-8) and v2 (+9, grown by a job), and a held-out set of all ten digits."""
    _, held = digit_splits
    test = D.zip_image_folder({str(d): held.of(d)[20:] for d in range(10)})
    return client.post("/v1/datasets", files={"archive": ("test.zip", test)}).json()


def evaluate(client, settings, body: dict) -> dict:
    submitted = client.post("/v1/evaluations", json=body)
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["location"] == f"/v1/evaluations/{submitted.json()['id']}"
    assert submitted.json()["status"] == "queued"
    pipeline.run_job(submitted.json()["id"], settings)
    return client.get(f"/v1/evaluations/{submitted.json()['id']}").json()


def test_two_versions_are_scored_and_compared_on_the_same_images(client, settings, lineage):
    body = {"model": "digits", "versions": [1, 2], "dataset_id": lineage["id"]}
    done = evaluate(client, settings, body)
    assert done["status"] == "succeeded", done["error"]
    assert done["versions"] == [1, 2] and done["progress"]["stage"] == "done"
    result = done["result"]
    labels = lineage["labels"]
    nines, total = labels["9"], lineage["num_images"]
    v1, v2 = result["versions"]
    assert v1["overall"]["n"] == total - nines and v1["unscored"] == {"n": nines, "labels": ["9"]}
    assert v2["overall"]["n"] == total and v2["new_labels"]["n"] == nines
    assert v2["new_labels"]["accuracy"] > 0.5  # chance is 0.1
    for label, row in v2["per_class"].items():
        assert row["support"] == labels[label]
        assert set(row["ci95"]) == {"precision", "recall", "f1"}
    (pair,) = result["comparisons"]
    assert (pair["a"], pair["b"], pair["n"]) == (1, 2, total - nines)
    assert pair["both_right"] + pair["lost"] + pair["gained"] + pair["both_wrong"] == pair["n"]
    assert (
        0 <= pair["p_value"] <= 1
        and "versions 1 and 2" in pair["summary"]
        or ("more accurate" in pair["summary"])
    )
    assert result["backbone_passes"] == 1  # v2 was grown in head mode: one pass serves both
    # nothing is stored but the figures
    versions = client.get("/v1/models/digits").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    # it is a job too, of its own kind
    as_job = client.get(f"/v1/jobs/{done['id']}").json()
    assert as_job["kind"] == "evaluate" and as_job["metrics"] == result
    kinds = {j["id"]: j["kind"] for j in client.get("/v1/jobs").json()["items"]}
    assert kinds[done["id"]] == "evaluate" and sorted(kinds.values()) == ["evaluate", "expand"]
    only = client.get("/v1/jobs", params={"kind": "evaluate"}).json()["items"]
    assert [j["id"] for j in only] == [done["id"]]
    listed = client.get("/v1/evaluations", params={"model": "digits"}).json()["items"]
    assert [e["id"] for e in listed] == [done["id"]]


def test_a_second_evaluation_reads_the_kept_pixels_and_scores_the_same(client, settings, lineage):
    body = {"model": "digits", "versions": [1, 2], "dataset_id": lineage["id"]}
    first = evaluate(client, settings, body)["result"]
    images = lineage["num_images"]
    assert first["decoded_cache"] == [
        {"state": "stored", "images": images, "bytes": images * 3 * 32 * 32}
    ]
    second = evaluate(client, settings, body)["result"]
    assert [p["state"] for p in second["decoded_cache"]] == ["hit"]
    assert second["versions"] == first["versions"]
    assert second["comparisons"] == first["comparisons"]


def test_the_report_shows_the_versions_side_by_side(client, settings, lineage):
    body = {"model": "digits", "versions": [2, 1], "dataset_id": lineage["id"]}
    done = evaluate(client, settings, body)
    page = client.get(f"/v1/evaluations/{done['id']}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for needle in ('id="versions"', 'id="pairs"', 'id="labels"', "v2 → v1", "v1 recall"):
        assert needle in text
    assert f"n={lineage['num_images']}" in text  # every figure says what it rests on
    png = client.get(f"/v1/evaluations/{done['id']}/report.png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (1200, 800)


def test_what_cannot_be_evaluated_is_a_422_that_says_why(client, lineage, digit_splits):
    ok = {"model": "digits", "versions": [1, 2], "dataset_id": lineage["id"]}
    cases = [
        ({**ok, "model": "digit"}, "model", "did you mean 'digits'"),
        ({**ok, "versions": [1, 7]}, "versions", "version 7 of 'digits' does not exist"),
        ({**ok, "versions": [2, 2]}, "versions", "distinct"),
        ({**ok, "versions": []}, "versions", ""),
        ({**ok, "dataset_id": "nope"}, "dataset_id", "no dataset"),
        ({**ok, "base_version": 1}, "base_version", ""),
    ]
    for body, field, says in cases:
        assert_problem(client.post("/v1/evaluations", json=body), 422, field=field, says=says)
    cats = D.zip_image_folder({"cat": digit_splits[1].of(0)[:3]})
    other = client.post("/v1/datasets", files={"archive": ("cats.zip", cats)}).json()
    response = client.post("/v1/evaluations", json={**ok, "dataset_id": other["id"]})
    assert_problem(response, 422, field="dataset_id", says="none of the dataset's labels (cat)")
    assert client.get("/v1/evaluations").json()["items"] == []  # nothing was queued


def test_few_images_and_unknown_labels_are_said_in_warnings(
    client, settings, lineage, digit_splits
):
    held = digit_splits[1]
    small = D.zip_image_folder({"0": held.of(0)[:4], "1": held.of(1)[:4], "cat": held.of(2)[:2]})
    dataset = client.post("/v1/datasets", files={"archive": ("s.zip", small)}).json()
    body = {"model": "digits", "versions": [1], "dataset_id": dataset["id"]}
    queued = client.post("/v1/evaluations", json=body).json()
    warnings = " ".join(queued["warnings"])
    assert "scored on 8 images only" in warnings
    assert "2 images of labels no version knows are not scored: cat" in warnings
    pipeline.run_job(queued["id"], settings)
    result = client.get(f"/v1/evaluations/{queued['id']}").json()["result"]
    (v1,) = result["versions"]
    assert v1["overall"]["n"] == 8 and result["comparisons"] == []
    low, high = v1["overall"]["ci95"]["accuracy"]
    assert high - low > 0.2  # eight images: a wide interval, and it says so


def test_idempotency_cancel_and_kinds_keep_apart(client, lineage):
    body = {"model": "digits", "versions": [1, 2], "dataset_id": lineage["id"]}
    key = {"Idempotency-Key": "eval-1"}
    first = client.post("/v1/evaluations", json=body, headers=key).json()
    again = client.post("/v1/evaluations", json=body, headers=key).json()
    assert again["id"] == first["id"]
    other = client.post("/v1/evaluations", json={**body, "versions": [2]}, headers=key)
    assert_problem(other, 422, field="Idempotency-Key")
    assert_problem(client.get(f"/v1/evaluations/{first['id']}/report"), 409, says="queued")
    cancelled = client.post(f"/v1/evaluations/{first['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/evaluations/{first['id']}/cancel"), 409)
    job = next(j for j in client.get("/v1/jobs").json()["items"] if j["kind"] == "expand")
    assert_problem(client.get(f"/v1/evaluations/{job['id']}"), 404)
    assert_problem(client.post(f"/v1/evaluations/{job['id']}/cancel"), 404)


def test_an_old_label_set_is_what_the_first_version_knew(client, settings, lineage):
    done = evaluate(
        client, settings, {"model": "digits", "versions": [2], "dataset_id": lineage["id"]}
    )
    (v2,) = done["result"]["versions"]
    assert v2["old_labels"]["n"] == lineage["num_images"]  # its own labels are the baseline's
    assert v2["new_labels"]["n"] == 0 and v2["new_labels"]["accuracy"] is None
    assert sorted(v2["labels"]) == sorted([str(d) for d in OLD] + ["9"])


def test_an_evaluation_says_which_of_its_images_a_version_was_fitted_on(
    client, settings, lineage, digit_splits
):
    _, held = digit_splits
    # 10 images of each digit the job trained v2 on, and 10 no job saw
    mixed = D.zip_image_folder({str(d): held.of(d)[10:30] for d in OLD} | {"9": held.of(9)[5:15]})
    dataset = client.post("/v1/datasets", files={"archive": ("mixed.zip", mixed)}).json()
    body = {"model": "digits", "versions": [1, 2], "dataset_id": dataset["id"]}
    done = evaluate(client, settings, body)
    assert done["status"] == "succeeded", done["error"]
    overlap = done["result"]["overlap"]
    assert overlap["1"] == {"trained_on": None, "remembered": 0, "images": 190}
    assert overlap["2"]["trained_on"] == 9 * 10 + 5  # what v2's lineage says it was fitted on
    assert overlap["2"]["remembered"] == 9 * 10 + 5  # and its reference set keeps
    assert any("version 2 was fitted on 95" in w for w in done["warnings"])
    assert done["result"]["hygiene"]["copies_removed"] == 0
