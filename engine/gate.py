"""The gate: whether a new version may replace the model's latest, by a rule declared in advance.

Four checks, each on images scored by a layer that never saw them (see ``evaluate``):

1. **Retention, non-inferior.** Retention is old-class accuracy after over before, on the same
   images. The version passes when the lower end of its 95 % interval is at least
   ``min_retention - margin``: the evidence rules out a loss beyond the margin. It fails when
   the upper end is below ``min_retention``: the evidence rules out keeping the minimum.
   Between the two the version is *held*: the images cannot tell, and the answer says how many
   more would. With a 0.98 minimum and a 0.03 margin, a version that truly keeps 95 % is
   promoted about 5 % of the time whatever ``n`` (bench/gate.py prints the rule's operating
   characteristics).
2. **No old label collapsed.** For every old label, an exact one-sided McNemar test of its
   images lost against gained, adjusted across the labels by Tarone's method for discrete tests
   (labels that changed too few images to ever reach significance are not counted, so the
   adjustment is over the labels that moved, not all of them); a label is *collapsed* when the
   adjusted p is below ``alpha`` and its recall fell by at least ``label_max_drop``. Labels
   that only the unadjusted test flags are named to *watch*; they do not hold the version.
3. **Every new label learned.** Its recall must beat ``max(chance, new_label_min_recall)``
   with evidence (an exact binomial test, Holm-adjusted across new labels). A label whose 95 %
   interval lies wholly below that floor *failed* (a folder of images that are not one thing, a
   split folder taken for a label); one with too few images to tell holds the version.
4. **"Before" above chance.** A model that scores near chance on its own labels (closer to
   chance than a quarter of the way to perfect) is mis-described (label order, preprocessing):
   retention as a ratio of two chance-level figures would mean nothing, so it is not computed.

Decision: ``rejected`` when any check fails; else ``unverified`` when retention cannot be
measured (too few old-label images, or a "before" near chance); else ``held`` when any check
cannot tell; else ``promoted``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from engine.evidence import Paired, holm, mcnemar_exact, tarone, wilson

PROMOTED, HELD, REJECTED, UNVERIFIED = "promoted", "held", "rejected", "unverified"


@dataclass(frozen=True)
class GateSettings:
    min_retention: float = 0.98  # the share of old-class accuracy a version should keep
    margin: float = 0.03  # promoted when a retention below min_retention - margin is ruled out
    min_images: int = 20  # old-label images needed to measure retention at all
    label_max_drop: float = 0.10  # a label's recall drop that counts as a collapse
    new_label_min_recall: float = 0.10  # a new label must beat this (and chance) with evidence
    alpha: float = 0.05  # family-wise error of the per-label checks

    @property
    def bound(self) -> float:
        return self.min_retention - self.margin

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (in log space: n may be large)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    logs = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _retention(old: dict, s: GateSettings, num_old: int) -> dict:
    """Check 1 (and 4): retention against the bound."""
    counts = old.get("paired") or {}
    n = old.get("n") or 0
    cell = Paired(**counts) if counts else Paired(0, 0, 0, 0)
    base = {"n": n, "paired": counts or None, "bound": round(s.bound, 6)}
    if n < s.min_images:
        why = (
            "no old-label images to measure retention on"
            if n == 0
            else f"{n} old-label image{'s' if n != 1 else ''} to measure retention on, fewer "
            f"than the {s.min_images} needed"
        )
        return base | {"verdict": "unmeasured", "why": why, "retention": None, "ci95": None}
    before = cell.right_before / n
    chance = 1 / num_old if num_old > 1 else None
    if chance is not None and before < chance + 0.25 * (1 - chance):
        why = (
            f"the model scores {_pct(before)} on its own labels (n={n}), near the "
            f"{_pct(chance)} of chance, so retention would mean nothing; likely causes: labels "
            "listed in another order than the model's outputs, preprocessing (input size, mean, "
            "std) other than the model was trained with, or folders that are not the labels"
        )
        return base | {"verdict": "near_chance", "why": why, "retention": None, "ci95": None}
    retention = cell.retention
    low, high = cell.retention_interval()
    shown = f"{_pct(retention)} (95% interval {_pct(low)}-{_pct(high)}, n={n})"
    if low >= s.bound:
        verdict = "pass"
        why = (
            f"old-class accuracy kept {shown}: a loss beyond the {_pct(s.bound)} bound is ruled out"
        )
    elif high < s.min_retention:
        verdict = "fail"
        why = f"old-class accuracy kept {shown}: below the {_pct(s.min_retention)} minimum"
    else:
        verdict = "unclear"
        why = (
            f"old-class accuracy kept {shown}: {n} images cannot rule out a loss beyond the "
            f"{_pct(s.bound)} bound"
        )
    strong = low >= s.min_retention if verdict == "pass" else high < s.bound
    out = base | {
        "verdict": verdict,
        "why": why,
        "retention": retention,
        "ci95": [low, high],
        "strong": strong,
    }
    if verdict == "unclear":
        out["images_to_decide"] = _images_to_decide(n, retention, low, s.bound)
    return out


def _images_to_decide(n: int, retention: float, low: float, bound: float) -> int | None:
    """About how many measured images the interval needs to clear the bound if the retention
    stays where it is (its half-width shrinks as 1/sqrt(n)); None when it cannot."""
    if retention <= bound or retention - low <= 0:
        return None
    return math.ceil(n * ((retention - low) / (retention - bound)) ** 2)


def _old_labels(per_class: dict, old_labels: list[str], s: GateSettings) -> dict:
    """Check 2: per old label, a one-sided exact McNemar test, Tarone-adjusted."""
    rows = []
    for label in old_labels:
        info = per_class.get(label) or {}
        counts = info.get("paired")
        if not counts or not info.get("support"):
            continue
        lost, gained = counts["lost"], counts["gained"]
        p = binomial_upper_tail(lost, lost + gained, 0.5) if lost else 1.0
        drop = (lost - gained) / info["support"]
        rows.append((label, counts, info["support"], drop, p))
    # the least p a label's test can give: every changed image lost
    smallest = [0.5 ** (c["lost"] + c["gained"]) for _, c, *_ in rows]
    counted, adjusted = tarone([r[4] for r in rows], smallest, s.alpha)
    collapsed, watch = [], []
    for (label, counts, n, drop, p), p_adj in zip(rows, adjusted, strict=True):
        if drop < s.label_max_drop or p >= s.alpha:
            continue
        right_before = counts["both_right"] + counts["lost"]
        entry = {
            "label": label,
            "n": n,
            "recall_before": round(right_before / n, 6),
            "recall_after": round((counts["both_right"] + counts["gained"]) / n, 6),
            "lost": counts["lost"],
            "gained": counts["gained"],
            "p": round(p, 6),
            "p_adjusted": round(p_adj, 6),
        }
        (collapsed if p_adj < s.alpha else watch).append(entry)
    # the fewest images right before with which an all-lost label would still be caught
    needed = math.ceil(math.log2(counted / s.alpha)) if rows else None
    thin = sorted(
        label
        for label, counts, *_ in rows
        if needed and counts["both_right"] + counts["lost"] < needed
    )
    return {
        "checked": len(rows),
        "counted": counted,  # labels that changed enough images to be tested (Tarone)
        "collapsed": collapsed,
        "watch": watch,
        "detectable_from": needed,
        "too_few_to_check": thin,
    }


def _new_labels(per_class: dict, new_labels: list[str], num_classes: int, s: GateSettings) -> dict:
    """Check 3: every new label beats its floor with evidence."""
    floor = max(1 / max(num_classes, 1), s.new_label_min_recall)
    rows = []
    for label in new_labels:
        info = per_class.get(label) or {}
        n = info.get("support") or 0
        hits = round((info.get("recall") or 0.0) * n)
        rows.append((label, hits, n, binomial_upper_tail(hits, n, floor) if n else 1.0))
    adjusted = holm([r[3] for r in rows])
    # held-out images, all recognised, that beat the floor after Holm's adjustment
    needed = (
        math.ceil(math.log(s.alpha / max(len(rows), 1)) / math.log(floor)) if floor < 1 else None
    )
    out = {}
    for (label, hits, n, _), p_adj in zip(rows, adjusted, strict=True):
        interval = wilson(hits, n)
        if n and p_adj < s.alpha:
            verdict = "learned"
        elif interval is not None and interval[1] < floor:
            verdict = "failed"
        else:
            verdict = "unclear"
        out[label] = {
            "verdict": verdict,
            "recall": hits / n if n else None,
            "n": n,
            "ci95": interval,
            "floor": round(floor, 6),
            "p_holm": round(p_adj, 6),
            "measured_needed": needed,
        }
    return out


def decide(
    metrics: dict[str, Any],
    labels: list[str],
    num_old: int,
    settings: GateSettings | None = None,
) -> dict[str, Any]:
    """The gate's decision on an expansion's metrics (``expansion_metrics``'s), with every
    check's figures, one sentence of reason and the next steps that would change it."""
    s = settings or GateSettings()
    old_labels, new_labels = labels[:num_old], labels[num_old:]
    per_class = metrics.get("per_class") or {}
    retention = _retention(metrics.get("old_classes") or {}, s, num_old)
    measured = retention["verdict"] not in ("unmeasured", "near_chance")
    collapse = _old_labels(per_class, old_labels, s) if measured else None
    learned = _new_labels(per_class, new_labels, len(labels), s)

    failures, doubts = [], []
    if retention["verdict"] == "fail":
        failures.append(retention["why"])
    elif retention["verdict"] == "unclear":
        doubts.append(retention["why"])
    for c in (collapse or {}).get("collapsed", []):
        failures.append(
            f"old label {c['label']!r} collapsed: recall {_pct(c['recall_before'])} -> "
            f"{_pct(c['recall_after'])} (n={c['n']}, adjusted p={c['p_adjusted']:.2g})"
        )
    for label, check in learned.items():
        shown = "–" if check["recall"] is None else _pct(check["recall"])
        if check["verdict"] == "failed":
            failures.append(
                f"new label {label!r} was not learned: recall {shown} (n={check['n']}), below "
                f"the {_pct(check['floor'])} floor"
            )
        elif check["verdict"] == "unclear":
            doubts.append(
                f"new label {label!r} cannot be judged: recall {shown} on {check['n']} held-out "
                f"image{'s' if check['n'] != 1 else ''} does not show it beats "
                f"{_pct(check['floor'])}"
            )

    if failures:
        decision, reasons = REJECTED, failures
    elif not measured:
        decision, reasons = UNVERIFIED, [retention["why"]]
    elif doubts:
        decision, reasons = HELD, doubts
    else:
        learned_shown = [
            f"{label!r} {_pct(c['recall'])} (n={c['n']})" for label, c in learned.items()
        ]
        decision, reasons = PROMOTED, [retention["why"]]
        if learned_shown:
            reasons.append("new labels learned: " + ", ".join(learned_shown))
    if decision == PROMOTED:
        evidence = "strong" if retention.get("strong") else "within margin"
    elif decision == REJECTED:
        # a label check that fails is conclusive; a retention below the minimum is conclusive
        # when it is below the bound too
        weak = failures == [retention["why"]] and not retention.get("strong")
        evidence = "weak" if weak else "strong"
    elif decision == HELD:
        evidence = "weak"
    else:
        evidence = "none"
    cell = Paired(**retention["paired"]) if retention.get("paired") else None
    gate = {
        "decision": decision,
        "evidence": evidence,
        "reason": f"{decision}: " + "; ".join(reasons),
        "settings": s.as_dict(),
        "n": retention["n"],
        "retention": retention["retention"],
        "ci95": retention["ci95"],
        "paired": retention["paired"],
        "mcnemar_p": round(mcnemar_exact(cell.lost, cell.gained), 6) if cell and measured else None,
        "checks": {"retention": retention, "old_labels": collapse, "new_labels": learned},
    }
    gate["next_steps"] = next_steps(gate, per_class, old_labels)
    return gate


def next_steps(gate: dict[str, Any], per_class: dict, old_labels: list[str]) -> list[str]:
    """What would change the decision, in the service's terms (the API and CLI add how)."""
    checks, steps = gate["checks"], []
    retention = checks["retention"]
    if retention["verdict"] == "unmeasured":
        steps.append(
            f"measure retention: give the job at least {gate['settings']['min_images']} images "
            "of the model's labels (in the dataset, or as the base version's reference set)"
        )
    elif retention["verdict"] == "near_chance":
        steps.append(
            "check the base version: its labels must be in the order of its outputs and its "
            "preprocessing what it was trained with"
        )
    elif retention["verdict"] == "unclear":
        wanted = retention.get("images_to_decide")
        thinnest = sorted(
            old_labels, key=lambda label: (per_class.get(label) or {}).get("support") or 0
        )
        if wanted:
            steps.append(
                f"about {wanted} measured old-label images would decide it if retention stays "
                f"at {_pct(retention['retention'])} (now {retention['n']}): add reference "
                f"images, first of {', '.join(repr(x) for x in thinnest[:5])}"
            )
        else:
            steps.append(
                "at the measured retention more images would most likely reject it: make the new "
                "labels take fewer old images (a lower max_old_accuracy_drop, more old-label "
                "images to train on)"
            )
    collapse = checks.get("old_labels") or {}
    if collapse.get("collapsed"):
        names = ", ".join(repr(c["label"]) for c in collapse["collapsed"])
        steps.append(
            f"look at the confusion matrix for what took {names}: a new label too close to "
            "them needs more images of both"
        )
    for label, check in checks["new_labels"].items():
        if check["verdict"] == "failed":
            steps.append(
                f"check the images of {label!r}: one folder must hold one thing (a folder of "
                "several kinds, or a train/val split folder, is not a label)"
            )
        elif check["verdict"] == "unclear":
            needed = check.get("measured_needed")
            least = (
                f": it needs at least {needed + 1} for {needed} to be held out" if needed else ""
            )
            steps.append(f"add images of {label!r}{least}")
    return steps
