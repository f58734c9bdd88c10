"""The gate's operating characteristics, counted in one run (``engine.gate``).

``rule``        versions that truly keep 90-100 % of a base's old-class accuracy (bases at 85,
                95 and 99 %), measured on n = 20 to 540 images: how often the default rule
                promotes, holds and rejects each. Paired outcomes are drawn as a job measures
                them (lost among the images right before, gained among the wrong).
``sequential``  v1 -> v2 (+1 label) -> v3 (+1 label) through the engine's own cross-fitting, on
                Gaussian features whose truth is known (bases of about 85, 90, 95, 99 %): v3's
                measured "before" against the truth on the same label mix, how often its 95 %
                retention interval holds the true retention, and the gate's decisions; with the
                base's lineage (the default) and without it ("before" scored by the layer that
                was fitted on the remembered images, as versions were measured before lineages).
``collapse``    100 old labels, one of them losing about 25 points of recall, n images per
                label: how often the per-label check names it, and how often it names a label
                when none collapsed.
``new``         a new label at 0 %, at chance, and learned, on n held-out images: decisions.

Run with `.venv/bin/python bench/gate.py [--trials N] [--seeds N] [--tables rule ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.features import Memory, World, fit_base, grow, paired_metrics  # noqa: E402
from engine.gate import GateSettings, decide  # noqa: E402

SETTINGS = GateSettings()
SEPARATIONS = {0.85: 0.475, 0.90: 0.53, 0.95: 0.59, 0.99: 0.75}  # base accuracy -> World


def _version(generator: torch.Generator, before: float, retention: float, n: int) -> dict:
    """One measurement of a version with these true figures (a tenth of the wrong images are
    gained back, the loss comes from the right ones)."""
    gained_p = 0.1
    lost_p = max(0.0, 1 - retention + (1 - before) / before * gained_p)
    right = torch.rand(n, generator=generator) < before
    u = torch.rand(n, generator=generator)
    lost, gained = right & (u < lost_p), ~right & (u < gained_p)
    cells = [
        int((right & ~lost).sum()),
        int(lost.sum()),
        int(gained.sum()),
        int((~right & ~gained).sum()),
    ]
    metrics, labels, num_old = paired_metrics([(0, *cells)], [(20, 20)])
    return decide(metrics, labels, num_old, SETTINGS)


def table_rule(trials: int) -> None:
    print(
        f"\n## rule: min_retention {SETTINGS.min_retention}, margin {SETTINGS.margin} (promoted "
        f"when the 95 % interval's lower end >= {SETTINGS.bound:.2f}); {trials} trials per cell;"
        " share promoted / held / rejected"
    )
    sizes = (20, 60, 180, 540)
    print(f"{'base':>5} {'true retention':>14} " + " ".join(f"{f'n={n}':>17}" for n in sizes))
    generator = torch.Generator().manual_seed(0)
    for before in (0.85, 0.95, 0.99):
        for retention in (0.90, 0.95, 0.97, 0.98, 0.99, 1.00):
            cells = []
            for n in sizes:
                decisions = Counter(
                    _version(generator, before, retention, n)["decision"] for _ in range(trials)
                )
                shares = [decisions[d] / trials for d in ("promoted", "held", "rejected")]
                shares[1] += decisions["unverified"] / trials
                cells.append("/".join(f"{s:.2f}" for s in shares))
            print(f"{before:>5.2f} {retention:>14.2f} " + " ".join(f"{c:>17}" for c in cells))


def _sequence(world: World, seed: int, shots: int, per_label: int) -> dict:
    """v1 on labels 0-7, v2 learns 8 from ``shots`` images and a reference set of
    ``per_label`` per label, v3 learns 9 from ``shots`` images and v2's reference set."""
    v1 = fit_base(world, list(range(8)), 40)
    rx, ry, rd = world.draw(dict.fromkeys(range(8), per_label))
    sx, sy, sd = world.draw({8: shots})
    x, y, d = torch.cat([sx, rx]), torch.cat([sy, ry]), sd + rd
    v2 = grow(v1, None, x, y, d, 8, 1, seed)
    layer2 = (v2.layer.weight, v2.layer.bias)
    memory = Memory(x, y, d).capped(per_label)
    nx, ny, nd = world.draw({9: shots})
    x3, y3, d3 = torch.cat([nx, memory.x]), torch.cat([ny, memory.y]), nd + memory.digests
    recalls2 = world.recalls(layer2, list(range(9)))
    out = {}
    for name, lineage in (("lineage", v2.lineage), ("in-sample", None)):
        v3 = grow(layer2, lineage, x3, y3, d3, 9, 1, seed)
        measured = y3[v3.groups]
        weights = torch.bincount(measured[measured < 9], minlength=9).float()
        recalls3 = world.recalls((v3.layer.weight, v3.layer.bias), list(range(10)))
        true_before = float((weights * recalls2).sum() / weights.sum())
        true_after = float((weights * recalls3[:9]).sum() / weights.sum())
        old = v3.metrics["old_classes"]
        low, high = old["ci95"]["retention"]
        truth = true_after / true_before
        gate = decide(v3.metrics, [str(c) for c in range(10)], 9, SETTINGS)
        out[name] = {
            "before": old["accuracy_before"],
            "true_before": true_before,
            "retention": old["retention"],
            "truth": truth,
            "covered": low <= truth <= high,
            "decision": gate["decision"],
            "n": old["n"],
            "recall": float(recalls3[9]),
        }
    return out


def table_sequential(seeds: int, shots: int = 10, per_label: int = 20) -> None:
    print(
        f"\n## sequential: v1 (labels 0-7) -> v2 (+8) -> v3 (+9), {shots} images of each new "
        f"label, a reference set of {per_label} per label; Gaussian features, truth on 4,000 "
        f"draws per label; {seeds} seeds per base"
    )
    print(
        f"{'base':>5} {'v3 measured':<10} {'before':>7} {'true':>6} {'retention':>9} "
        f"{'true':>6} {'covered':>8} {'n':>4} {'promoted':>8} {'of truly>=98%':>13}  decisions"
    )
    for accuracy, separation in SEPARATIONS.items():
        runs = [
            _sequence(World(separation=separation, seed=s), s, shots, per_label)
            for s in range(seeds)
        ]
        for name in ("lineage", "in-sample"):
            rows = [r[name] for r in runs]
            keeping = [r for r in rows if r["truth"] >= 0.98]
            promoted = sum(r["decision"] == "promoted" for r in keeping)
            decisions = Counter(r["decision"] for r in rows)
            print(
                f"{accuracy:>5.2f} {name:<10} {statistics.mean(r['before'] for r in rows):>7.3f} "
                f"{statistics.mean(r['true_before'] for r in rows):>6.3f} "
                f"{statistics.mean(r['retention'] for r in rows):>9.3f} "
                f"{statistics.mean(r['truth'] for r in rows):>6.3f} "
                f"{sum(r['covered'] for r in rows) / len(rows):>8.2f} {rows[0]['n']:>4} "
                f"{promoted / max(len(keeping), 1):>8.2f} {len(keeping):>13}  "
                + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items())),
                flush=True,
            )


def table_collapse(trials: int, labels: int = 100) -> None:
    print(
        f"\n## collapse: {labels} old labels at 92 % recall; one falls to about 67 % (25 points)"
        f" or none does; per-label check Tarone-adjusted at alpha {SETTINGS.alpha}, drop >= "
        f"{SETTINGS.label_max_drop}; {trials} trials"
    )
    print(f"{'images per label':>16} {'collapse named':>14} {'watched':>8} {'false alarm':>11}")
    generator = torch.Generator().manual_seed(1)

    def outcomes(n: int, collapse: bool) -> list[tuple[int, int, int, int, int]]:
        out = []
        for c in range(labels):
            right = torch.rand(n, generator=generator) < 0.92
            lose = 0.27 if collapse and c == 0 else 0.005
            u = torch.rand(n, generator=generator)
            lost, gained = right & (u < lose), ~right & (u < 0.05)
            out.append(
                (
                    c,
                    int((right & ~lost).sum()),
                    int(lost.sum()),
                    int(gained.sum()),
                    int((~right & ~gained).sum()),
                )  # fmt: skip
            )
        return out

    for n in (20, 50, 100):
        named = watched = alarms = 0
        for _ in range(trials):
            gate = decide(*paired_metrics(outcomes(n, True), [(20, 20)]), SETTINGS)
            check = gate["checks"]["old_labels"]
            named += any(c["label"] == "o0" for c in check["collapsed"])
            watched += any(c["label"] == "o0" for c in check["watch"])
            quiet = decide(*paired_metrics(outcomes(n, False), [(20, 20)]), SETTINGS)
            alarms += bool(quiet["checks"]["old_labels"]["collapsed"])
        print(
            f"{n:>16} {named / trials:>14.2f} {watched / trials:>8.2f} {alarms / trials:>11.2f}",
            flush=True,
        )


def table_new(trials: int) -> None:
    print(
        f"\n## new labels: one new label next to 9 old ones (chance 10 %, floor "
        f"{max(0.1, SETTINGS.new_label_min_recall):.0%}); old labels kept; {trials} trials; "
        "share promoted / held / rejected"
    )
    print(f"{'true recall':>11} " + " ".join(f"{f'n={n}':>17}" for n in (0, 1, 4, 10, 30, 110)))
    generator = torch.Generator().manual_seed(2)
    old = [(c, 18, 0, 0, 2) for c in range(9)]
    for recall in (0.0, 0.1, 0.3, 0.6, 0.9):
        cells = []
        for n in (0, 1, 4, 10, 30, 110):
            decisions: Counter[str] = Counter()
            for _ in range(trials):
                hits = int((torch.rand(n, generator=generator) < recall).sum())
                decisions[decide(*paired_metrics(old, [(hits, n)]), SETTINGS)["decision"]] += 1
            shares = [decisions[d] / trials for d in ("promoted", "held", "rejected")]
            cells.append("/".join(f"{s:.2f}" for s in shares))
        print(f"{recall:>11.2f} " + " ".join(f"{c:>17}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["rule", "sequential", "collapse", "new"],
        choices=["rule", "sequential", "collapse", "new"],
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same figures run after run
    started = time.perf_counter()
    if "rule" in args.tables:
        table_rule(args.trials)
    if "sequential" in args.tables:
        table_sequential(args.seeds)
    if "collapse" in args.tables:
        table_collapse(args.trials // 4)
    if "new" in args.tables:
        table_new(args.trials // 4)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
