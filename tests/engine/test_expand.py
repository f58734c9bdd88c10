"""The engine on real data: digits 0-8 model learns "9" and keeps what it knew."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import torch

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.data import scan_image_folder, stratified_split
from engine.errors import JobCancelled, UnsupportedHead, WeightsError
from engine.expand import ExpansionConfig, expand_classifier
from engine.export import export_onnx
from engine.refit import slow_on_cpu
from engine.weights import (
    load_classifier,
    load_pickled_state_dict,
    read_state_dict,
    tensor_layout,
)
from tests.conftest import digits_request

OLD_LABELS = [str(d) for d in OLD]


@pytest.fixture(scope="module")
def expansion(tmp_path_factory, digit_splits, base_weights):
    _, held = digit_splits
    folders = {str(d): held.of(d)[:20] for d in OLD} | {"9": held.of(9)[:10]}
    root = D.write_image_folder(tmp_path_factory.mktemp("images"), folders)
    stages = []
    result = expand_classifier(digits_request(base_weights, root), progress=stages.append)
    return result, stages


def held_out_predictions(model, held: D.Digits) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions on images that were in no upload (index 40 on, per digit)."""
    images = [im for d in range(10) for im in held.of(d)[40:]]
    targets = torch.tensor([d for d in range(10) for _ in held.of(d)[40:]])
    with torch.inference_mode():
        return model(D.tensors(images)).argmax(1), targets


def test_new_label_is_learnt_and_old_accuracy_barely_moves(expansion, digit_splits, base_weights):
    result, _ = expansion
    _, held = digit_splits
    base, _ = load_classifier(ARCH, 9, base_weights)
    before, targets = held_out_predictions(base, held)
    after, _ = held_out_predictions(result.model, held)
    old = targets < 9
    acc_before = (before[old] == targets[old]).float().mean().item()
    acc_after = (after[old] == targets[old]).float().mean().item()
    recall = (after[~old] == 9).float().mean().item()
    assert result.labels == OLD_LABELS + ["9"]
    assert acc_before > 0.97
    assert acc_before - acc_after < 0.02
    assert recall > 0.6


def test_old_rows_are_bit_identical(expansion, base_weights):
    result, _ = expansion
    base = read_state_dict(base_weights)
    grown = result.model.state_dict()
    assert torch.equal(grown["fc.weight"][:9], base["fc.weight"])
    assert torch.equal(grown["fc.bias"][:9], base["fc.bias"])
    for key, tensor in base.items():
        if not key.startswith("fc."):
            assert torch.equal(grown[key], tensor), key


def test_metrics_describe_every_image(expansion):
    result, stages = expansion
    m = result.metrics
    assert (m["old_classes"]["n"], m["new_classes"]["n"]) == (180, 10)
    assert m["measurement"]["measured"] == {"old": 180, "new": 10, "from_reference": 0}
    assert m["confusion_matrix"]["labels"] == OLD_LABELS + ["9"]
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 190
    assert m["per_class"]["9"]["support"] == m["new_classes"]["n"]
    assert m["method"] == "imprint+refit" and m["history"] == []  # one convex fit, no epochs
    solver = m["refit"]  # five folds' refits, then the layer's on every image
    assert solver["count"] == 6 and solver["device"] == "cpu"
    assert solver["final"]["features"] == 512 and solver["final"]["classes"] == 10
    assert solver["final"]["rows"] >= 190  # every image, each with its views
    assert 0 < solver["final"]["iterations"] <= solver["iterations_max"] <= 200
    assert solver["gradient_max"] < 1e-3, solver  # stopped near the optimum, not at the cap
    assert slow_on_cpu(solver) is None  # a second's work says nothing
    hours = solver | {"seconds": 3 * 3600}
    assert "a GPU worker solves them in seconds" in slow_on_cpu(hours)
    assert "180 minutes on the CPU" in slow_on_cpu(hours)
    assert slow_on_cpu(hours | {"device": "cuda"}) is None
    assert [s.stage for s in stages][0] == "loading"
    assert {"extracting", "training", "evaluating"} <= {s.stage for s in stages}


def test_onnx_export_matches_torch(expansion, tmp_path, digit_splits):
    result, _ = expansion
    path = tmp_path / "model.onnx"
    export_onnx(result.model, D.PREP, path)
    x = D.tensors(digit_splits[1].images[:5])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        torch_logits = result.model(x).numpy()
    assert onnx_logits.shape == (5, 10)
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-3, atol=1e-4)


def test_cancellation_stops_the_engine(tmp_path, digit_splits, base_weights):
    _, held = digit_splits
    root = D.write_image_folder(tmp_path, {"0": held.of(0)[:4], "9": held.of(9)[:4]})
    request = digits_request(base_weights, root, ExpansionConfig(batch_size=2))
    with pytest.raises(JobCancelled):
        expand_classifier(request, should_stop=lambda: True)


def test_split_is_stratified_and_keeps_a_training_image_per_class():
    targets = [0] * 10 + [1] * 2 + [2]
    train, val = stratified_split(targets, 0.2, seed=0)
    assert sorted(train + val) == list(range(13))
    assert sum(targets[i] == 0 for i in val) == 2
    assert sum(targets[i] == 1 for i in val) == 1
    assert [targets[i] for i in train].count(2) == 1


def test_a_model_that_transforms_its_logits_is_refused(tmp_path, digit_splits):
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) * 2

    from engine.data import ImageDataset, eval_transform
    from engine.features import extract_features
    from engine.heads import find_head

    model = Scaled()
    root = D.write_image_folder(tmp_path, {"0": digit_splits[1].of(0)[:2]})
    loader = torch.utils.data.DataLoader(
        ImageDataset(scan_image_folder(root), D.PREP, eval_transform(D.PREP)), batch_size=2
    )
    with pytest.raises(UnsupportedHead, match="transforms"):
        extract_features(model, find_head(model), loader, torch.device("cpu"))


class TestWeightFiles:
    def test_a_torch_state_dict_is_opened_in_a_sandbox(self, tmp_path, base_weights):
        from engine import intake, sandbox

        path = tmp_path / "w.pt"
        torch.save({"state_dict": read_state_dict(base_weights)}, path)
        labels = [str(d) for d in range(9)]

        def check(folder, limits):
            folder.mkdir()
            return intake.check_model(
                folder,
                architecture="timm:resnet18",
                labels=labels,
                upload=path,
                preprocessing=D.PREP.to_dict(),
                exports=[],
                metadata={"architecture": "timm:resnet18", "labels": labels},
                limits=limits,
            )

        answer = check(tmp_path / "ok", sandbox.Limits())
        converted = tmp_path / "ok" / answer["files"]["safetensors"]
        assert torch.equal(
            read_state_dict(converted)["fc.weight"], read_state_dict(base_weights)["fc.weight"]
        )
        with pytest.raises(sandbox.OverLimit, match="longer than"):
            check(tmp_path / "slow", sandbox.Limits(wall_s=0.05))

    def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(self, tmp_path):
        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        path = tmp_path / "evil.pt"
        with zipfile.ZipFile(path, "w") as zf:  # torch.save's layout with a hostile data.pkl
            zf.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}))
            zf.writestr("evil/version", "3\n")
        with pytest.raises(WeightsError, match="weights_only"):
            load_pickled_state_dict(path)
        plain = tmp_path / "evil.pkl"
        plain.write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(WeightsError):
            load_pickled_state_dict(plain)
        assert not marker.exists()

    def test_a_whole_pickled_module_is_refused(self, tmp_path):
        path = tmp_path / "module.pt"
        torch.save(torch.nn.Linear(2, 2), path)
        with pytest.raises(WeightsError, match="weights_only"):
            load_pickled_state_dict(path)

    def test_torchscript_is_refused(self, tmp_path):
        path = tmp_path / "scripted.pt"
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
        with pytest.raises(WeightsError):
            load_pickled_state_dict(path)

    def test_label_count_mismatch_names_both_numbers(self, base_weights):
        with pytest.raises(WeightsError, match="10 labels were given but .* has 9 outputs"):
            load_classifier(ARCH, 10, base_weights)

    def test_missing_misshapen_and_mistyped_keys_are_listed(self, base_weights, tmp_path):
        state = read_state_dict(base_weights)
        del state["conv1.weight"]
        state["bn1.weight"] = torch.zeros(3)
        state["layer1.0.bn1.running_mean"] = torch.zeros(64, dtype=torch.int32)
        path = tmp_path / "edited.safetensors"
        safetensors.torch.save_file(state, str(path))
        with pytest.raises(WeightsError) as refused:
            load_classifier(ARCH, 9, path)
        message = str(refused.value)
        assert "missing keys: ['conv1.weight']" in message
        assert "bn1.weight: expected [64], got [3]" in message
        assert "layer1.0.bn1.running_mean: expected float, got I32" in message
        other = tmp_path / "other.safetensors"
        safetensors.torch.save_file({"x": torch.zeros(2)}, str(other))
        with pytest.raises(WeightsError, match="unexpected keys: \\['x'\\]"):
            load_classifier(ARCH, 9, other)

    def test_a_header_that_lies_is_refused_before_any_tensor_is_read(self, tmp_path):
        header = json.dumps(
            {"fc.weight": {"dtype": "F32", "shape": [10**6, 1000], "data_offsets": [0, 4 * 10**9]}}
        ).encode()
        path = tmp_path / "lying.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
        with pytest.raises(WeightsError, match="unreadable safetensors"):
            tensor_layout(path)
        huge = tmp_path / "huge-header.safetensors"
        huge.write_bytes((2**40).to_bytes(8, "little") + b"{")
        with pytest.raises(WeightsError, match="header claims"):
            tensor_layout(huge)
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        with pytest.raises(WeightsError):
            tensor_layout(garbage)


@pytest.mark.parametrize("policy", ["last_block", "none"])
def test_unfreezing_trains_what_the_policy_says_and_keeps_old_rows(
    policy, tmp_path, digit_splits, base_weights
):
    from engine.train import HeadTraining

    _, held = digit_splits
    folders = {str(d): held.of(d)[:8] for d in OLD} | {"9": held.of(9)[:8]}
    root = D.write_image_folder(tmp_path, folders)
    config = ExpansionConfig(freeze=policy, training=HeadTraining(epochs=2, learning_rate=1e-3))
    result = expand_classifier(digits_request(base_weights, root, config))
    base = read_state_dict(base_weights)
    grown = result.model.state_dict()

    assert torch.equal(grown["fc.weight"][:9], base["fc.weight"])
    assert torch.equal(grown["fc.bias"][:9], base["fc.bias"])
    changed = {
        k for k, v in base.items() if not k.startswith("fc.") and not torch.equal(grown[k], v)
    }
    assert changed, "the unfrozen backbone did not learn"
    assert all("running_" not in k and "num_batches" not in k for k in changed)  # BN stats kept
    if policy == "last_block":
        assert all(k.startswith("layer4.1.") for k in changed), sorted(changed)[:5]
    else:
        assert any(k.startswith("conv1.") for k in changed)
    assert result.metrics["method"] == f"imprint+refit+finetune:{policy}"
    assert len(result.metrics["history"]) == 2  # the head refitted on features, 2 epochs end to end
    assert result.metrics["old_classes"]["n"] == 18


def test_trainable_old_rows_move_slowly_when_the_backbone_is_unfrozen(
    tmp_path, digit_splits, base_weights
):
    from engine.train import HeadTraining

    _, held = digit_splits
    folders = {str(d): held.of(d)[:8] for d in OLD} | {"9": held.of(9)[:8]}
    root = D.write_image_folder(tmp_path, folders)
    original = read_state_dict(base_weights)["fc.weight"]

    def drift(scale: float) -> float:
        training = HeadTraining(
            epochs=2, learning_rate=1e-3, old_rows_frozen=False, old_rows_lr_scale=scale
        )
        config = ExpansionConfig(freeze="last_block", training=training, solver="sgd")
        rows = expand_classifier(digits_request(base_weights, root, config)).model.state_dict()[
            "fc.weight"
        ][:9]
        return ((rows - original).norm() / original.norm()).item()

    slow, full = drift(0.01), drift(1.0)
    assert 0 < slow < full / 5
