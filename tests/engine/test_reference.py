"""Reference sets in the engine: new-label uploads alone keep the old labels, every old image is
measured, an image counts once, cached features spare the backbone."""

from __future__ import annotations

import torch

from devkit import digits as D
from devkit.digits import OLD
from engine.data import scan_image_folder
from engine.expand import expand_classifier
from engine.reference import Kept, ReferenceSet, herding, select_reference
from engine.weights import load_classifier
from tests.conftest import digits_request


def _held_out(model, held) -> tuple[float, float]:
    images = [im for d in range(10) for im in held.of(d)[60:]]
    y = torch.tensor([d for d in range(10) for _ in held.of(d)[60:]])
    with torch.inference_mode():
        predicted = model(D.tensors(images)).argmax(1)
    old = y < 9
    return (predicted[old] == y[old]).float().mean().item(), (predicted[~old] == 9).float().mean()


def _folders(held, old_from: int, old_to: int, shots: int = 10) -> dict:
    return {str(d): held.of(d)[old_from:old_to] for d in OLD} | {"9": held.of(9)[:shots]}


def test_new_label_images_alone_keep_the_old_labels_with_a_reference_set(
    tmp_path, digit_splits, base_weights
):
    _, held = digit_splits
    job = D.write_image_folder(tmp_path / "job", {"9": held.of(9)[:10]})
    memory = D.write_image_folder(tmp_path / "ref", {str(d): held.of(d)[:20] for d in OLD})
    request = digits_request(base_weights, job)

    alone = expand_classifier(request)
    assert alone.metrics["old_classes"]["n"] == 0  # nothing to measure retention on

    request.reference = ReferenceSet.from_folder(memory)
    result = expand_classifier(request)
    m = result.metrics
    assert m["old_classes"]["n"] == 180 and m["new_classes"]["n"] == 10
    assert m["measurement"]["measured"]["from_reference"] == 180
    assert m["reference"]["used"] == {str(d): 20 for d in OLD}

    base, _ = load_classifier("timm:resnet18", 9, base_weights)
    before, _ = _held_out(base, held)
    forgetful, _ = _held_out(alone.model, held)
    after, recall = _held_out(result.model, held)
    assert before - forgetful > 0.1  # without old images the new row takes old ones
    assert before - after <= 0.015 and recall > 0.6  # with a reference set it does not
    kept = {}
    for k in result.reference:
        kept[k.label] = kept.get(k.label, 0) + 1
    assert kept == {str(d): 20 for d in OLD} | {"9": 10}
    assert all((k.path is not None) == (k.label == "9") for k in result.reference)


def test_every_old_image_is_measured_by_a_layer_that_never_saw_it(
    tmp_path, digit_splits, base_weights
):
    _, held = digit_splits
    root = D.write_image_folder(tmp_path / "images", _folders(held, 0, 20))
    result = expand_classifier(digits_request(base_weights, root))
    m = result.metrics
    assert m["measurement"]["method"] == "cross_fitted" and m["measurement"]["folds"] == 5
    assert m["old_classes"]["n"] == 180 and m["new_classes"]["n"] == 10  # not a 20 % slice
    assert sum(m["confusion_matrix"]["matrix"][9]) == 10
    low, high = m["old_classes"]["ci95"]["retention"]
    assert low <= m["old_classes"]["retention"] <= high


def test_an_image_uploaded_again_counts_once(tmp_path, digit_splits, base_weights):
    _, held = digit_splits
    root = D.write_image_folder(tmp_path / "job", _folders(held, 0, 10))
    memory = D.write_image_folder(tmp_path / "ref", {str(d): held.of(d)[5:15] for d in OLD})
    request = digits_request(base_weights, root)
    request.reference = ReferenceSet.from_folder(memory)
    result = expand_classifier(request)
    # 10 uploaded + 10 remembered per digit, 5 of them the same images
    assert result.metrics["old_classes"]["n"] == 9 * 15
    assert result.metrics["reference"]["used"] == {str(d): 5 for d in OLD}
    assert len({(k.digest, k.label) for k in result.reference}) == len(result.reference)


def test_cached_features_spare_reading_the_reference_images(tmp_path, digit_splits, base_weights):
    _, held = digit_splits
    job = D.write_image_folder(tmp_path / "job", {"9": held.of(9)[:10]})
    memory = ReferenceSet.from_folder(
        D.write_image_folder(tmp_path / "ref", {str(d): held.of(d)[:20] for d in OLD})
    )
    request = digits_request(base_weights, job)
    request.reference = memory
    first = expand_classifier(request)
    fingerprint = first.fingerprint
    assert len(first.features) == 190

    fetched = []
    cache = {d: f for d, f in first.features.items()}

    def fetch(images):
        fetched.extend(images)
        return memory.fetch(images)

    request.reference = ReferenceSet(
        memory.images, fetch, lambda fp: cache if fp == fingerprint else {}
    )
    second = expand_classifier(request)
    assert fetched == [] and second.metrics["feature_cache"]["reference_cached"] == 180
    pairs = zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b)
    assert second.fingerprint == fingerprint  # a head-only job keeps the backbone

    request.reference = ReferenceSet(memory.images, fetch, lambda fp: {})
    expand_classifier(request)
    assert len(fetched) == 180  # no cache: every image is read


def test_herding_keeps_a_set_whose_mean_is_the_labels_mean():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator) + torch.linspace(0, 3, 16)
    target = torch.nn.functional.normalize(features, dim=1).mean(0)

    def gap(rows):
        chosen = torch.nn.functional.normalize(features[rows], dim=1).mean(0)
        return (chosen - target).norm().item()

    picked = herding(features, 20)
    assert len(set(picked)) == 20
    random_gaps = [gap(torch.randperm(400, generator=generator)[:20]) for _ in range(50)]
    assert gap(picked) < min(random_gaps)

    candidates = [Kept(str(i), "a" if i < 300 else "b", None) for i in range(400)]
    kept = select_reference(candidates, features, 20, "herding")
    assert [k.label for k in kept].count("a") == 20 and [k.label for k in kept].count("b") == 20
    assert len(select_reference(candidates, features, 500, "random")) == 400


def test_folder_reference_sets_name_images_by_content(tmp_path, digit_splits):
    _, held = digit_splits
    root = D.write_image_folder(tmp_path / "ref", {"0": held.of(0)[:3] * 2})  # each twice
    memory = ReferenceSet.from_folder(root)
    assert len(memory.images) == 3
    samples = memory.fetch(memory.images)
    assert [s.label for s in samples] == ["0"] * 3
    assert {s.path for s in samples} <= set(p.path for p in scan_image_folder(root))
