"""Versions scored side by side on real digit scans: a base that knows 0-8, a version grown in
head mode that learnt 9, and one whose last block was fine-tuned."""

from __future__ import annotations

import pytest
import torch

from devkit import digits as D
from devkit.digits import ARCH, OLD
from engine.compare import CompareConfig, VersionFile, compare_versions, measure
from engine.data import scan_image_folder
from engine.evidence import f1_interval, holm
from engine.expand import ExpansionConfig, expand_classifier
from engine.train import HeadTraining
from engine.weights import save_safetensors
from tests.conftest import digits_request

LABELS = [str(d) for d in OLD]


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, base_weights, digit_splits):
    """v1 (the base), v2 (head mode, +9), v3 (last block fine-tuned, +9), and a held-out set
    of every digit none of them trained on."""
    _, held = digit_splits
    root = tmp_path_factory.mktemp("compare")
    train = D.write_image_folder(
        root / "train", {str(d): held.of(d)[:10] for d in OLD} | {"9": held.of(9)[:15]}
    )
    test = D.write_image_folder(root / "test", {str(d): held.of(d)[10:] for d in range(10)})
    v2 = expand_classifier(digits_request(base_weights, train))
    tuned = ExpansionConfig(
        freeze="last_block", training=HeadTraining(epochs=2, learning_rate=1e-3)
    )
    v3 = expand_classifier(digits_request(base_weights, train, tuned))
    files = [VersionFile(1, ARCH, LABELS, base_weights, D.PREP)]
    for number, result in ((2, v2), (3, v3)):
        path = root / f"v{number}.safetensors"
        save_safetensors(path, result.model, {})
        files.append(VersionFile(number, ARCH, result.labels, path, D.PREP))
    return files, scan_image_folder(test)


def test_every_version_scores_the_images_whose_label_it_knows(lineage):
    files, samples = lineage
    stages = []
    result = compare_versions(files, samples, CompareConfig(device="cpu"), stages.append)
    nines = sum(s.label == "9" for s in samples)
    v1, v2, v3 = result["versions"]
    assert v1["overall"]["n"] == len(samples) - nines  # v1 cannot be asked about 9
    assert v1["unscored"] == {"n": nines, "labels": ["9"]}
    assert v2["overall"]["n"] == v3["overall"]["n"] == len(samples)
    assert v2["new_labels"]["n"] == nines and v2["old_labels"]["n"] == len(samples) - nines
    assert v2["new_labels"]["accuracy"] > 0.5  # chance is 0.1
    assert v1["overall"]["accuracy"] > 0.9
    for label, row in v2["per_class"].items():
        assert row["support"] == sum(s.label == label for s in samples)
        low, high = row["ci95"]["f1"]
        assert low <= row["f1"] <= high
    assert sum(map(sum, v2["confusion_matrix"]["matrix"])) == len(samples)
    # v1 and v2 share a backbone (head mode): one pass for both, one more for v3
    assert result["backbone_passes"] == 2
    assert {s.stage for s in stages} >= {"loading", "extracting", "evaluating"}


def test_a_pair_is_compared_on_the_same_images(lineage):
    files, samples = lineage
    result = compare_versions(files, samples, CompareConfig(device="cpu"))
    by_pair = {(p["a"], p["b"]): p for p in result["comparisons"]}
    assert set(by_pair) == {(1, 2), (1, 3), (2, 3)}
    one_two = by_pair[(1, 2)]
    assert one_two["n"] == result["versions"][0]["overall"]["n"]  # the images both know: 0-8
    cells = ("both_right", "lost", "gained", "both_wrong")
    assert sum(one_two[c] for c in cells) == one_two["n"]
    assert one_two["accuracy_a"]["accuracy"] == result["versions"][0]["overall"]["accuracy"]
    # a changed prediction is a lost or gained image, or a wrong one that stayed wrong
    assert one_two["changed"]["n"] >= one_two["lost"] + one_two["gained"]
    two_three = by_pair[(2, 3)]
    assert two_three["n"] == len(samples)
    low, high = two_three["difference"]["ci95"]
    assert low <= two_three["difference"]["value"] <= high
    for p in result["comparisons"]:
        assert p["p_value"] <= p["p_value_holm"] <= 1
        assert (p["p_value_holm"] < 0.05) == p["significant"]
        assert f"versions {p['a']} and {p['b']}" in p["summary"] or "more accurate" in p["summary"]


def test_a_version_made_worse_on_purpose_is_found_significantly_worse(lineage, tmp_path):
    """The same predictions with a fifth of the right answers turned wrong: the paired test
    must say so, and name the better version."""
    files, samples = lineage
    v1 = files[0]
    truth = torch.tensor([LABELS.index(s.label) for s in samples if s.label in LABELS])
    known = [i for i, s in enumerate(samples) if s.label in LABELS]
    good = torch.full((len(samples),), -1)
    good[torch.tensor(known)] = truth
    bad = good.clone()
    spoiled = torch.tensor(known[::5])
    bad[spoiled] = (good[spoiled] + 1) % 9
    worse = VersionFile(7, ARCH, LABELS, v1.weights, D.PREP)
    result = measure([v1, worse], samples, {1: good, 7: bad})
    (pair,) = result["comparisons"]
    assert pair["lost"] == len(spoiled) and pair["gained"] == 0
    assert pair["significant"] and pair["p_value"] < 1e-6
    assert pair["summary"].startswith("version 1 is more accurate than version 7")
    assert pair["difference"]["ci95"][1] < 0


def test_the_statistics_behave_at_their_edges():
    assert f1_interval(0, 0, 0) is None  # no image of the label
    low, high = f1_interval(50, 0, 0)
    assert 0.9 < low < high <= 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []
