"""Intervals and the paired test: the numbers a user decides on (the gate: test_gate.py)."""

from __future__ import annotations

import random

import pytest

from engine.evaluate import expansion_metrics
from engine.evidence import Paired, mcnemar_exact, wilson


def test_wilson_matches_published_values_and_behaves_at_the_edges():
    # Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-4)
    low, high = wilson(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # 10 of 10 is not "certainly 100 %"
    low, high = wilson(0, 3)
    assert low == 0.0 and high > 0.5  # 0 of 3 says little
    assert wilson(0, 0) is None


def test_exact_mcnemar_is_a_binomial_test_of_the_changed_images():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # 2 * 0.5**6
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=1e-4)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert 0 < mcnemar_exact(5000, 5400) < 1e-3  # large n in log space, no overflow


def test_the_retention_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = random.Random(0)
    true_before, lose, gain = 0.95, 0.03, 0.01  # P(right before), P(lost), P(gained)
    cells_p = [true_before - lose, lose, gain, 1 - true_before - gain]
    true_retention = (cells_p[0] + cells_p[2]) / (cells_p[0] + cells_p[1])
    inside = 0
    for trial in range(200):
        cells = [0, 0, 0, 0]
        for _ in range(300):
            cells[rng.choices(range(4), cells_p)[0]] += 1
        low, high = Paired(*cells).retention_interval(seed=trial)
        inside += low <= true_retention <= high
    assert 180 <= inside <= 199  # 90-99.5 % of 200 intervals


def test_an_unchanged_model_still_gets_an_honest_interval():
    low, high = Paired(both_right=440, lost=0, gained=0, both_wrong=8).retention_interval()
    assert low < 1.0 < high and high - low < 0.02  # not the point [1, 1]


def test_every_figure_carries_its_n_and_interval():
    import torch

    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    before = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0])
    after = torch.tensor([0, 1, 1, 1, 1, 2, 2, 0])
    m = expansion_metrics(y, before, after, ["a", "b", "new"], num_old=2)
    old = m["old_classes"]
    assert old["n"] == 5 and old["paired"] == {
        "both_right": 2,
        "lost": 1,
        "gained": 1,
        "both_wrong": 1,
    }
    assert old["accuracy_before"] == old["accuracy_after"] == 3 / 5
    assert set(old["ci95"]) == {
        "accuracy_before",
        "accuracy_after",
        "retention",
        "prediction_agreement",
    }
    assert m["new_classes"] == {"accuracy": 2 / 3, "n": 3, "ci95": {"accuracy": wilson(2, 3)}}
    assert m["overall"]["n"] == 8 and m["overall"]["ci95"]["accuracy"] == wilson(5, 8)
    new = m["per_class"]["new"]
    assert (new["support"], new["predicted"]) == (3, 2)
    assert new["ci95"] == {"precision": wilson(2, 2), "recall": wilson(2, 3)}
    assert m["per_class"]["a"]["ci95"]["recall_before"] == wilson(2, 3)
