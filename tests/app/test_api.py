"""Every 4xx of the HTTP contract, against the real app and a real SQLite database."""

from __future__ import annotations

import io
import json

import pytest
import torch

from devkit.digits import ARCH, OLD, digits_archive, register_digits

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, *, field: str | None = None, says: str = ""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert says in body["detail"], body["detail"]
    assert "Traceback" not in response.text
    if field:
        assert field in [e["field"] for e in body["errors"]], body["errors"]
    return body


@pytest.fixture()
def dataset(client, digit_splits):
    archive = digits_archive(digit_splits[1], old_per_class=3, new_shots=3)
    response = client.post("/v1/datasets", files={"archive": ("d.zip", archive)})
    assert response.status_code == 201, response.text
    return response.json()


class TestModels:
    def test_registering_gives_version_1(self, model, client):
        assert model["version"] == 1 and model["num_classes"] == 9
        assert model["formats"] == ["safetensors", "onnx", "torchscript"]
        assert len(model["sha256"]) == 64
        listed = client.get("/v1/models").json()
        assert [m["name"] for m in listed["items"]] == ["digits"]
        assert client.get("/v1/models/digits").json()["latest_version"] == 1

    def test_name_taken_is_409(self, model, client, base_weights):
        assert_problem(register_digits(client, base_weights), 409, says="already exists")

    def test_bad_name_is_422_in_words_not_a_regex(self, client, base_weights):
        body = assert_problem(
            register_digits(client, base_weights, name="Digits"), 422, field="name"
        )
        assert "lower-case letters" in body["detail"] and "^[" not in body["detail"]
        job = client.post("/v1/jobs", json={"model": "Digits", "dataset_id": "x"})
        body = assert_problem(job, 422, field="model")
        assert "lower-case letters" in body["detail"] and "^[" not in body["detail"]

    def test_unknown_architecture_names_close_matches(self, client, base_weights):
        response = client.post(
            "/v1/models",
            data={"name": "x", "architecture": "timm:resnet81", "labels": '["a"]'},
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        body = assert_problem(response, 422, field="architecture", says="timm:resnet18")
        assert "close matches" in body["detail"]

    def test_a_name_without_its_family_is_told_the_families_that_have_it(
        self, client, base_weights
    ):
        response = client.post(
            "/v1/models",
            data={"name": "x", "architecture": "resnet18", "labels": '["a"]'},
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        body = assert_problem(response, 422, field="architecture", says="timm:resnet18")
        assert "torchvision:resnet18" in body["detail"]
        assert "keras:resnet18" not in body["detail"] and "onnx:resnet18" not in body["detail"]

    def test_label_count_mismatch_says_both_numbers(self, client, base_weights):
        response = client.post(
            "/v1/models",
            data={"name": "x", "architecture": ARCH, "labels": json.dumps(list("abc"))},
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        assert_problem(response, 422, field="weights", says="3 labels were given")
        assert "9 outputs" in response.json()["detail"]

    @pytest.mark.parametrize("labels", ["not json", "[]", '["a", "a"]', '["", "b"]', "{}"])
    def test_bad_labels_are_422(self, client, base_weights, labels):
        response = client.post(
            "/v1/models",
            data={"name": "x", "architecture": ARCH, "labels": labels},
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        assert_problem(response, 422, field="labels")

    def test_wrong_architecture_for_the_weights_lists_keys(self, client, base_weights):
        response = client.post(
            "/v1/models",
            data={
                "name": "x",
                "architecture": "timm:resnet34",
                "labels": json.dumps([str(d) for d in OLD]),
            },
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        assert_problem(response, 422, field="weights", says="missing keys")

    def test_pickled_module_is_refused(self, client):
        buffer = io.BytesIO()
        torch.save(torch.nn.Linear(2, 2), buffer)
        response = client.post(
            "/v1/models",
            data={"name": "x", "architecture": ARCH, "labels": '["a"]'},
            files={"weights": ("w.pt", buffer.getvalue())},
        )
        assert_problem(response, 422, field="weights", says="weights_only")

    def test_a_pt_state_dict_registers(self, client, base_weights, tmp_path):
        import safetensors.torch

        path = tmp_path / "digits.pt"
        torch.save(safetensors.torch.load_file(str(base_weights)), path)
        response = client.post(
            "/v1/models",
            data={
                "name": "from-pt",
                "architecture": ARCH,
                "labels": json.dumps([str(d) for d in OLD]),
            },
            files={"weights": ("digits.pt", path.read_bytes())},
        )
        assert response.status_code == 201, response.text
        assert response.json()["formats"] == ["safetensors", "onnx", "torchscript"]

    def test_a_malicious_pickle_is_refused_and_runs_no_code(self, client, tmp_path):
        import os
        import pickle
        import zipfile

        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("evil/data.pkl", pickle.dumps({"fc.weight": Exploit()}))
            zf.writestr("evil/version", "3\n")
        response = client.post(
            "/v1/models",
            data={"name": "evil", "architecture": ARCH, "labels": '["a"]'},
            files={"weights": ("evil.pt", archive.getvalue())},
        )
        assert_problem(response, 422, field="weights", says="weights_only")
        assert not marker.exists()
        assert_problem(client.get("/v1/models/evil"), 404)

    def test_bad_preprocessing_is_422(self, client, base_weights):
        response = client.post(
            "/v1/models",
            data={
                "name": "x",
                "architecture": ARCH,
                "labels": json.dumps([str(d) for d in OLD]),
                "preprocessing": '{"input_size": [3, 32], "mean": [0], "std": [1]}',
            },
            files={"weights": ("w.safetensors", base_weights.read_bytes())},
        )
        assert_problem(response, 422, says="invalid preprocessing")

    def test_missing_fields_are_422(self, client):
        assert_problem(client.post("/v1/models", data={"name": "x"}), 422, field="architecture")

    def test_unknown_model_version_and_format_are_404(self, model, client):
        assert_problem(client.get("/v1/models/nope"), 404)
        assert_problem(client.get("/v1/models/digits/versions/7"), 404)
        assert_problem(client.get("/v1/models/digits/versions/3/artifact?format=onnx"), 404)
        assert_problem(client.get("/v1/models/digits/versions/1/artifact?format=tflite"), 422)

    def test_artifact_download_is_the_stored_file(self, model, client):
        response = client.get("/v1/models/digits/versions/1/artifact")
        assert response.status_code == 200
        assert response.headers["etag"] == f'"{model["sha256"]}"'
        assert int(response.headers["content-length"]) == model["size_bytes"]
        assert "digits-v1.safetensors" in response.headers["content-disposition"]

    def test_predict_answers_top_k(self, model, client, digit_splits):
        _, held = digit_splits
        images = []
        for digit in (3, 7):
            out = io.BytesIO()
            held.of(digit)[50].save(out, format="PNG")
            images.append(("image", (f"{digit}.png", out.getvalue(), "image/png")))
        response = client.post(
            "/v1/models/digits/versions/1/predict", files=images, data={"top_k": "2"}
        )
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p[0]["label"] for p in predictions] == ["3", "7"]
        assert all(len(p) == 2 for p in predictions)

    def test_predict_with_a_non_image_is_422(self, model, client):
        response = client.post(
            "/v1/models/digits/versions/1/predict",
            files=[("image", ("x.png", b"nope", "image/png"))],
        )
        assert_problem(response, 422, field="image")

    def test_pagination(self, client, base_weights):
        for name in ("a1", "a2", "a3"):
            assert register_digits(client, base_weights, name=name).status_code == 201
        first = client.get("/v1/models?limit=2").json()
        assert [m["name"] for m in first["items"]] == ["a1", "a2"]
        second = client.get(f"/v1/models?limit=2&cursor={first['next_cursor']}").json()
        assert [m["name"] for m in second["items"]] == ["a3"] and second["next_cursor"] is None
        assert_problem(client.get("/v1/models?limit=501"), 422, field="limit")


class TestDatasets:
    def test_upload_reports_labels(self, dataset, client):
        assert dataset["labels"] == {**{str(d): 3 for d in OLD}, "9": 3}
        assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
        assert client.get("/v1/datasets").json()["items"] == [dataset]

    def test_archive_without_images_is_422_with_reasons(self, client):
        archive = io.BytesIO()
        import zipfile

        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("cat/a.txt", "hello")
        response = client.post("/v1/datasets", files={"archive": ("d.zip", archive.getvalue())})
        body = assert_problem(response, 422, says="no usable image")
        assert "cat/a.txt" in body["errors"][0]["message"]

    def test_zip_slip_is_422_and_leaves_nothing(self, client, settings, tmp_path):
        import zipfile

        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("../../escaped.png", b"x")
        response = client.post("/v1/datasets", files={"archive": ("d.zip", archive.getvalue())})
        assert_problem(response, 422, field="archive", says="refused")
        assert not list(tmp_path.rglob("escaped.png"))
        assert list((settings.tmp_dir).iterdir()) == []

    def test_delete_then_404(self, dataset, client):
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert_problem(client.get(f"/v1/datasets/{dataset['id']}"), 404)
        assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 404)

    def test_delete_while_a_job_uses_it_is_409(self, model, dataset, client):
        assert (
            client.post(
                "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"]}
            ).status_code
            == 202
        )
        assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409, says="used by job")

    def test_too_many_form_parts_is_a_400_problem(self, client):
        fields = {f"field{i}": "x" for i in range(1001)}
        response = client.post(
            "/v1/datasets", data=fields, files={"archive": ("d.zip", b"PK\x05\x06" + b"\0" * 18)}
        )
        assert_problem(response, 400, says="Too many fields")

    def test_body_over_the_limit_is_413(self, tmp_path, base_weights):
        from fastapi.testclient import TestClient

        from app.main import create_app
        from core.migrate import db_upgrade
        from core.settings import Settings

        small = Settings(data_dir=tmp_path / "small", sweep_interval_s=0, max_upload_bytes=1000)
        db_upgrade(small)
        with TestClient(create_app(small)) as c:
            response = c.post("/v1/datasets", files={"archive": ("d.zip", b"x" * 3_000_000)})
            assert_problem(response, 413)

            def chunks():  # no Content-Length: the limit is counted while the body streams
                for _ in range(40):
                    yield b"x" * 100_000

            streamed = c.post(
                "/v1/datasets",
                content=chunks(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            assert_problem(streamed, 413)
            assert list(small.tmp_dir.iterdir()) == []


class TestJobs:
    def submit(self, client, dataset, **body):
        return client.post(
            "/v1/jobs", json={"model": "digits", "dataset_id": dataset["id"], **body}
        )

    def test_submit_is_202_with_location_and_resolved_config(self, model, dataset, client):
        response = self.submit(client, dataset)
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["new_labels"] == ["9"]
        assert job["base_version"] == 1
        assert job["config"]["old_rows"] == "trainable" and job["config"]["epochs"] == 30
        assert job["config"]["calibration"] == "auto"
        assert job["config"]["max_old_accuracy_drop"] == 0.01
        assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
        assert [j["id"] for j in client.get("/v1/jobs?status=queued").json()["items"]] == [
            job["id"]
        ]
        assert client.get("/v1/jobs?model=other").json()["items"] == []

    def test_old_rows_are_frozen_when_the_dataset_has_no_old_label(
        self, model, client, digit_splits
    ):
        from devkit.digits import zip_image_folder

        archive = zip_image_folder({"9": digit_splits[1].of(9)[:3]})
        only_new = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
        job = self.submit(client, only_new).json()
        assert job["config"]["old_rows"] == "frozen"
        explicit = self.submit(client, only_new, config={"old_rows": "trainable"}).json()
        assert explicit["config"]["old_rows"] == "trainable"

    def test_freeze_policies_are_accepted_and_echoed(self, model, dataset, client):
        for policy in ("last_block", "none"):
            response = self.submit(client, dataset, config={"freeze": policy})
            assert response.status_code == 202, response.text
            assert response.json()["config"]["freeze"] == policy

    def test_idempotency_key_returns_the_same_job(self, model, dataset, client):
        headers = {"Idempotency-Key": "abc"}
        body = {"model": "digits", "dataset_id": dataset["id"]}
        first = client.post("/v1/jobs", json=body, headers=headers).json()
        again = client.post("/v1/jobs", json=body, headers=headers).json()
        assert first["id"] == again["id"]
        assert len(client.get("/v1/jobs").json()["items"]) == 1
        changed = client.post("/v1/jobs", json={**body, "config": {"epochs": 3}}, headers=headers)
        assert_problem(changed, 422, field="Idempotency-Key")

    @pytest.mark.parametrize(
        ("body", "field", "says"),
        [
            ({"new_labels": ["3"]}, "new_labels", "already labels of the base model"),
            ({"new_labels": ["zebra"]}, "new_labels", "has 0 images"),
            ({"config": {"min_images_per_label": 5}}, "new_labels", "at least 5"),
            ({"model": "nope"}, "model", "no model"),
            ({"base_version": 4}, "base_version", "no version 4"),
            ({"dataset_id": "nope"}, "dataset_id", "no dataset"),
            ({"config": {"epochs": -1}}, "config.epochs", ""),
            ({"config": {"freeze": "everything"}}, "config.freeze", ""),
            ({"config": {"calibration": "magic"}}, "config.calibration", ""),
            ({"config": {"max_old_accuracy_drop": 2}}, "config.max_old_accuracy_drop", ""),
            ({"config": {"unknown": 1}}, "config.unknown", ""),
            ({"config": {"augmentation": {"scale": [2, 1]}}}, "config.augmentation.scale", ""),
        ],
    )
    def test_bad_submissions_are_422(self, model, dataset, client, body, field, says):
        assert_problem(self.submit(client, dataset, **body), 422, field=field, says=says)

    def test_dataset_with_only_known_labels_is_422(self, model, client, digit_splits):
        from devkit.digits import zip_image_folder

        archive = zip_image_folder({"3": digit_splits[1].of(3)[:2]})
        ds = client.post("/v1/datasets", files={"archive": ("d.zip", archive)}).json()
        assert_problem(self.submit(client, ds), 422, field="new_labels", says="already a label")

    def test_unknown_job_is_404(self, client):
        assert_problem(client.get("/v1/jobs/nope"), 404)
        assert_problem(client.post("/v1/jobs/nope/cancel"), 404)
        assert_problem(client.get("/v1/jobs/nope/events"), 404)

    def test_cancel_a_queued_job_then_409(self, model, dataset, client):
        job = self.submit(client, dataset).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
        assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, says="finished")

    def test_malformed_json_is_422_problem(self, client):
        response = client.post(
            "/v1/jobs", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert_problem(response, 422)


class TestOperations:
    def test_health_ready_metrics_docs(self, client, base_weights):
        assert register_digits(client, base_weights).status_code == 201
        assert client.get("/healthz").json()["status"] == "ok"
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {
            "database": True,
            "broker": True,
            "disk": True,
        }
        metrics = client.get("/metrics").text
        assert 'graft_jobs{status="queued"} 0.0' in metrics
        assert 'graft_http_requests_total{method="POST",route="/v1/models",status="201"}' in metrics
        assert client.get("/docs").status_code == 200
        assert "/v1/jobs/{job_id}/events" in client.get("/openapi.json").json()["paths"]

    def test_readyz_is_503_when_the_database_is_gone(self, tmp_path):
        from fastapi.testclient import TestClient

        from app.main import create_app
        from core.settings import Settings

        broken = Settings(
            data_dir=tmp_path,
            sweep_interval_s=0,
            database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        )
        with TestClient(create_app(broken)) as c:
            response = c.get("/readyz")
        assert response.status_code == 503 and response.json()["checks"]["database"] is False


def test_every_operation_documents_an_example(client):
    """The OpenAPI document shows a request or response example for every endpoint."""
    import re

    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            text = json.dumps(operation)
            refs = re.findall(r"#/components/schemas/([^\"]+)", text)
            if "example" not in text and not any("example" in json.dumps(schemas[r]) for r in refs):
                missing.append(f"{method.upper()} {path}")
    assert missing == []
