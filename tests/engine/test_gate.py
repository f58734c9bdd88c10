"""The gate's declared rule: non-inferior retention, no collapsed old label, every new label
learned, and "before" above chance; each decision says why and what would change it."""

from __future__ import annotations

import torch

from devkit.features import paired_metrics
from engine.gate import GateSettings, binomial_upper_tail, decide


def _gate(outcomes, new=((9, 10),), settings=None):
    m, labels, num_old = paired_metrics(list(outcomes), list(new))
    return decide(m, labels, num_old, settings)


def _spread(labels: int, right: int, lost: int, gained: int, wrong: int):
    """The same paired counts spread over ``labels`` old labels."""
    return [
        (c, right // labels, lost // labels, gained // labels, wrong // labels)
        for c in range(labels)
    ]


def test_a_clear_loss_is_rejected_and_a_kept_level_promoted_both_strongly():
    loss = _gate(_spread(4, 400, 40, 0, 20))
    assert loss["decision"] == "rejected" and loss["evidence"] == "strong"
    assert "below the 98.0% minimum" in loss["reason"]
    kept = _gate(_spread(4, 400, 0, 4, 20))
    assert kept["decision"] == "promoted" and kept["evidence"] == "strong"
    assert kept["ci95"][0] >= 0.98 and kept["n"] == 424 and kept["next_steps"] == []


def test_an_interval_that_reaches_below_the_bound_holds_the_version_and_says_how_many_images():
    held = _gate(_spread(2, 38, 2, 0, 0))  # 95% kept on 40 images: cannot tell
    assert held["decision"] == "held" and held["evidence"] == "weak"
    check = held["checks"]["retention"]
    assert check["ci95"][0] < 0.95 <= check["ci95"][1]
    assert check["images_to_decide"] is None  # at 95 %, more images would not promote it
    nearly = _gate(_spread(2, 58, 2, 0, 0))  # 96.7 % of 60
    more = nearly["checks"]["retention"]["images_to_decide"]
    assert nearly["decision"] == "held" and more > 60
    assert f"about {more} measured old-label images would decide it" in nearly["next_steps"][0]
    # within the margin, but the evidence rules out a loss beyond it: promoted
    margin = _gate(_spread(4, 1600, 40, 0, 0))
    assert margin["decision"] == "promoted" and margin["evidence"] == "within margin"
    assert margin["retention"] < 0.98 <= margin["ci95"][1]


def test_too_few_images_and_a_base_near_chance_are_unverified_with_the_right_reason():
    few = _gate([(0, 10, 0, 0, 2)])
    assert few["decision"] == "unverified" and few["evidence"] == "none"
    assert "12 old-label images" in few["reason"] and few["retention"] is None
    # 0 of 50 and 1 of 50 right "before": the model is mis-described, not under-sampled
    for right in (0, 1):
        chance = _gate([(c, right if c == 0 else 0, 0, 0, 10) for c in range(5)])
        assert chance["decision"] == "unverified" and chance["retention"] is None
        assert "near the 20.0% of chance" in chance["reason"]
        assert "fewer than" not in chance["reason"]


def test_one_collapsed_label_of_a_hundred_is_named_though_pooled_retention_is_fine():
    outcomes = [(c, 46, 0, 0, 4) for c in range(100)]
    outcomes[0] = (0, 32, 14, 0, 4)  # 92 % -> 64 % on 50 images
    gate = _gate(outcomes)
    assert gate["retention"] > 0.99 and gate["checks"]["retention"]["verdict"] == "pass"
    assert gate["decision"] == "rejected"
    [collapsed] = gate["checks"]["old_labels"]["collapsed"]
    assert collapsed["label"] == "o0" and collapsed["p_adjusted"] < 0.05
    assert "old label 'o0' collapsed" in gate["reason"]
    # on 20 images too: the other labels changed nothing, so they are not counted (Tarone)
    small = [(c, 18, 0, 0, 2) for c in range(100)]
    small[0] = (0, 13, 5, 0, 2)
    caught = _gate(small)
    assert [c["label"] for c in caught["checks"]["old_labels"]["collapsed"]] == ["o0"]
    assert caught["checks"]["old_labels"]["counted"] == 1
    # among labels that all churn, the same loss cannot be told from chance: watched only
    churning = [(c, 15, 3, 3, 0) for c in range(100)]
    churning[0] = (0, 13, 5, 0, 2)
    watched = _gate(churning)
    assert watched["checks"]["old_labels"]["collapsed"] == []
    assert watched["checks"]["old_labels"]["watch"][0]["label"] == "o0"
    # a label with 3 images right before could not show even a total collapse
    thin = [(c, 18, 0, 0, 2) for c in range(99)] + [(99, 3, 0, 0, 0)]
    assert _gate(thin)["checks"]["old_labels"]["too_few_to_check"] == ["o99"]


def test_a_new_label_at_zero_is_rejected_and_one_too_small_to_judge_is_held():
    old = _spread(4, 400, 0, 0, 20)
    failed = _gate(old, new=[(0, 110)])
    assert failed["decision"] == "rejected"
    assert "new label 'n0' was not learned: recall 0.0% (n=110)" in failed["reason"]
    one_shot = _gate(old, new=[(0, 0)])
    assert one_shot["decision"] == "held"
    assert one_shot["checks"]["new_labels"]["n0"]["verdict"] == "unclear"
    assert any("add images of 'n0'" in step for step in one_shot["next_steps"])
    learned = _gate(old, new=[(8, 10), (4, 4)])
    assert learned["decision"] == "promoted"
    assert {c["verdict"] for c in learned["checks"]["new_labels"].values()} == {"learned"}


def test_settings_move_the_bound():
    version = _spread(2, 190, 10, 0, 0)  # 95 % of 200
    assert _gate(version)["decision"] != "promoted"
    lenient = GateSettings(min_retention=0.95, margin=0.05)
    assert _gate(version, settings=lenient)["decision"] == "promoted"


def test_the_rules_operating_characteristics():
    """A version that truly keeps 95 % is promoted about 5 % of the time; one that keeps all
    its accuracy almost always, from 180 images on."""
    generator = torch.Generator().manual_seed(0)

    def promoted(retention: float, n: int, trials: int = 300) -> float:
        count = 0
        for _ in range(trials):
            right = torch.rand(n, generator=generator) < 0.9
            lost = right & (torch.rand(n, generator=generator) < 1 - retention)
            outcome = [(0, int((right & ~lost).sum()), int(lost.sum()), 0, int((~right).sum()))]
            count += _gate(outcome, new=[(10, 10)])["decision"] == "promoted"
        return count / trials

    assert promoted(0.95, 60) <= 0.08
    assert promoted(0.95, 540) <= 0.08
    assert promoted(1.0, 180) >= 0.95


def test_the_binomial_tail_is_exact():
    assert binomial_upper_tail(0, 10, 0.3) == 1.0
    assert binomial_upper_tail(11, 10, 0.3) == 0.0
    assert abs(binomial_upper_tail(7, 10, 0.1) - 9.1216e-06) < 1e-9
    assert abs(binomial_upper_tail(5000, 10000, 0.5) - 0.503989) < 1e-5
