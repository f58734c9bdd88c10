"""Quality of label expansion on real scans: scikit-learn's digits, on bases of several
strengths.

A resnet18 is trained from scratch on the digits 0-8; then "9" is added. Four bases, so that no
default is chosen on one: ``strong`` (6 epochs on every base image: about 99.6 % held-out),
``98`` (5 epochs: about 98 %), ``93`` (14 epochs on a quarter of them: about 93 %) and ``87``
(10 epochs on 40 %: about 87 %). Every figure is measured on held-out images that no job saw
(``held.of(d)[60:]``, and the base images a base was not trained on); jobs draw their images
from ``held.of(d)[:60]``. Mean of ``--seeds`` draws.

``shots``: 1, 2, 5, 10 and 50 images of "9" plus 20 images of each old digit, by

  graft        Graft's engine with its defaults: the whole layer refitted, anchored to the
               original; cross-fitted; calibration brakes only on loss beyond noise
  uncalibrated the same with `calibration: none`
  sgd          the same with `solver: sgd`: new rows trained by epochs, old rows slowly (LwF)
  imprint      imprinted rows with a median-margin bias, calibrated, nothing fitted
  last_block   Graft with freeze=last_block, 10 epochs (head warm-up, then the last block too)
  none+lwf     Graft with freeze=none, 10 epochs: the whole backbone, old logits distilled
  logreg       a baseline: class-balanced logistic regression refitting the whole layer on
               standardised features (C=0.1), no calibration
  seed-style   expand the head, train the whole head with cross-entropy, Adam lr 1e-3,
               10 epochs, backbone frozen (the approach of the article Graft grew from)
  full-ft      expand the head and fine-tune every layer, Adam lr 1e-4, 10 epochs

`hind@0.3` and `hind@1.0` are ceilings, not methods: the recall the method's model would reach
with the best shift of its new logit, chosen in hindsight on the held-out images themselves,
losing at most 0.3 / 1.0 points of old-class accuracy.

``memory``: 10 images of "9" and old labels known three ways: 20 uploaded images per old
digit; no old image at all (the job answers `unverified`); only a reference set of 20 (or 5)
per old digit, picked from 60 at random or by herding (the two selections a job can apply
when it keeps a reference set).

``sequential``: a base trained on 0-7 with a reference set of 20 per digit; v2 learns "8"
from 10 images only, v3 learns "9" from 10 images only, each inheriting its parent's reference
set (capped at 20 per label) and its lineage (its fold layers: see ``engine.lineage``).
Each step's measured retention and 95 % interval against the truth on the held-out images (the
new version against its parent, on the same images), and the gate's decision.

``defaults``: the refit's ridges and the calibration's budget, a grid of candidates at 10 and 2
images of "9", on every base: the defaults are chosen on all of them, never on one.

``evidence``: what the job measured (cross-fitted, on its own images) against the truth on the
held-out images: old-class accuracy before, and the drop; and how often the 95 % intervals
held the truth.

Run with `.venv/bin/python bench/quality.py [--seeds N] [--tables shots memory ...]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit import digits as D  # noqa: E402
from engine.calibrate import Calibration  # noqa: E402
from engine.data import scan_image_folder  # noqa: E402
from engine.expand import ExpansionConfig, ExpansionRequest, expand_classifier  # noqa: E402
from engine.features import extract_features  # noqa: E402
from engine.gate import decide  # noqa: E402
from engine.heads import expand_head, find_head  # noqa: E402
from engine.reference import ReferenceSet, file_digest, select_reference  # noqa: E402
from engine.refit import Refit  # noqa: E402
from engine.train import HeadTraining  # noqa: E402

ARCH = "timm:resnet18"
OLD = list(range(9))
HOLDOUT_FROM = 60  # per digit, images from this index on are never uploaded


def _save(model, path: Path) -> Path:
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)
    )
    return path


def graft(
    base,
    folders,
    root,
    training: HeadTraining | None = None,
    freeze: str = "head",
    calibration: Calibration | None = None,
    reference: Path | None = None,
    labels: list[str] | None = None,
    new: list[str] | None = None,
    per_label: int = 100,
    solver: str = "refit",
    lineage=None,
    refit: Refit | None = None,
):
    """The engine as a job runs it; returns the result (model, metrics, kept reference)."""
    labels = labels or [str(d) for d in OLD]
    new = new or ["9"]
    samples = scan_image_folder(D.write_image_folder(root / "images", folders))
    config = ExpansionConfig(
        training=training or HeadTraining(old_rows_frozen=False),  # the service's default
        freeze=freeze,
        calibration=calibration or Calibration(),
        reference_per_label=per_label,
        solver=solver,
        refit=refit or Refit(),
    )
    weights = _save(base, root / "base.safetensors")
    memory = ReferenceSet.from_folder(reference) if reference else None
    request = ExpansionRequest(
        ARCH, labels, weights, D.PREP, samples, new, config, memory, lineage=lineage
    )
    return expand_classifier(request)


def seed_style(base, folders, _root):
    model = _copy(base)
    head = expand_head(model, find_head(model), 1)
    model.requires_grad_(False)
    head.module.requires_grad_(True)
    return _fit(model, head.module.parameters(), folders, lr=1e-3)


def full_finetune(base, folders, _root):
    model = _copy(base)
    expand_head(model, find_head(model), 1)
    return _fit(model.train(), model.parameters(), folders, lr=1e-4)


def logreg(base, folders, _root):
    """Class-balanced logistic regression on standardised features, every row refitted."""
    from sklearn.linear_model import LogisticRegression

    x, y = _xy(folders)
    features = _features(base, x)
    mean, std = features.mean(0), features.std(0) + 1e-6
    fit = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
    fit.fit(((features - mean) / std).numpy(), y.numpy())
    model = _copy(base)
    head = expand_head(model, find_head(model), 1)
    coef = torch.tensor(fit.coef_, dtype=torch.float32) / std
    with torch.no_grad():
        head.module.weight.copy_(coef)
        head.module.bias.copy_(torch.tensor(fit.intercept_, dtype=torch.float32) - coef @ mean)
    return model.eval()


def _features(model, x):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, torch.arange(len(x))), batch_size=256)
    feats, _ = extract_features(model, find_head(model), loader, torch.device("cpu"))
    return feats


def _fit(model, parameters, folders, lr: float, epochs: int = 10):
    """Adam, cross-entropy, batches of 32: the plain fine-tuning loop."""
    x, y = _xy(folders)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _copy(base, classes: int = len(OLD)):
    from engine.architectures import build_model

    model = build_model(ARCH, classes)
    model.load_state_dict(base.state_dict())
    return model.eval()


def _xy(folders):
    images = [im for label in folders for im in folders[label]]
    targets = torch.tensor([int(label) for label in folders for _ in folders[label]])
    return D.tensors(images), targets


def measure(model, x, y, base_old: float, num_old: int = 9) -> tuple[float, float, float, float]:
    """Old-class accuracy and new-class recall on the held-out images; and the *hindsight*
    recalls: the best any shift of the new logit could reach with at most 0.3 and 1.0 points of
    old-class accuracy lost, the shift chosen on these very images (a ceiling, not a method)."""
    with torch.inference_mode():
        logits = model(x)
    predicted = logits.argmax(1)
    old = y < num_old
    best_old = logits[:, :num_old].max(1)
    critical = best_old.values - logits[:, num_old]  # the new label wins iff shift > critical
    right_if_old = best_old.indices == y
    ceilings = {0.003: 0.0, 0.01: 0.0}
    for shift in torch.cat([critical + 1e-6, critical.min(0, keepdim=True).values - 1]):
        is_new = shift > critical
        old_acc = (right_if_old & ~is_new)[old].float().mean().item()
        for max_drop in ceilings:
            if old_acc >= base_old - max_drop - 1e-9:
                ceilings[max_drop] = max(ceilings[max_drop], is_new[~old].float().mean().item())
    return (
        (predicted[old] == y[old]).float().mean().item(),
        (predicted[~old] == y[~old]).float().mean().item(),
        ceilings[0.003],
        ceilings[0.01],
    )


# name: (epochs, share of the base images trained on)
BASES = {"strong": (6, 1.0), "98": (5, 1.0), "93": (14, 0.25), "87": (10, 0.4)}


def train_base(digits: D.Digits, classes: list[int], epochs: int = 6) -> torch.nn.Module:
    """The base model, the same run after run: one thread (parallel reductions reorder sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return D.train_base(digits, classes, ARCH, epochs=epochs)
    finally:
        torch.set_num_threads(threads)


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0


class Base:
    """A base model of the digits 0-8, and the held-out images that judge what is made of it:
    ``held.of(d)[60:]`` and the base images it was not trained on."""

    def __init__(self, name: str, base_digits: D.Digits, held: D.Digits) -> None:
        self.name = name
        self.epochs, share = BASES[name]
        order = np.random.default_rng(0).permutation(len(base_digits.targets))
        trained = np.zeros(len(order), bool)
        trained[order[: int(share * len(order))]] = True
        self.digits = D.Digits(
            [im for im, k in zip(base_digits.images, trained, strict=True) if k],
            base_digits.targets[trained],
        )
        self.model = train_base(self.digits, OLD, self.epochs)
        holdout = [(im, d) for d in range(10) for im in held.of(d)[HOLDOUT_FROM:]]
        holdout += [
            (im, int(t))
            for im, t, k in zip(base_digits.images, base_digits.targets, trained, strict=True)
            if not k
        ]
        self.x = D.tensors([im for im, _ in holdout])
        self.y = torch.tensor([d for _, d in holdout])
        self.old_accuracy = self.accuracy(self.model, OLD)

    def accuracy(self, model, digits: list[int]) -> float:
        mask = torch.isin(self.y, torch.tensor(digits))
        with torch.inference_mode():
            predicted = model(self.x[mask]).argmax(1)
        return (predicted == self.y[mask]).float().mean().item()

    def right(self, model, digits: list[int]) -> torch.Tensor:
        """Which held-out images of ``digits`` the model gets right."""
        mask = torch.isin(self.y, torch.tensor(digits))
        with torch.inference_mode():
            return model(self.x[mask]).argmax(1) == self.y[mask]

    @property
    def counts(self) -> str:
        return f"{int((self.y < 9).sum())} old, {int((self.y == 9).sum())} new held-out images"


class Bench:
    def __init__(self, seeds: int, bases: list[str]) -> None:
        self.seeds = seeds
        self.base_digits, self.held = D.load()
        self.bases = [Base(name, self.base_digits, self.held) for name in bases]

    def shots(self, seed: int, shots: int, old_per_class: int = 20) -> dict:
        g = torch.Generator().manual_seed(seed)
        new = self.held.of(9)[:HOLDOUT_FROM]
        pick = torch.randperm(len(new), generator=g)[:shots].tolist()
        folders = {str(d): self.held.of(d)[:old_per_class] for d in OLD}
        folders["9"] = [new[i] for i in pick]
        return folders


def row(label: str, rows: list[tuple], width: int = 22) -> str:
    """Means over seeds of (drop, recall, old accuracy, seconds, *extra)."""
    drop = statistics.mean(r[0] for r in rows)
    recall = statistics.mean(r[1] for r in rows)
    old_acc = statistics.mean(r[2] for r in rows)
    seconds = statistics.mean(r[3] for r in rows)
    extra = [statistics.mean(r[i] for r in rows) for i in range(4, len(rows[0]))]
    return (
        f"{label:<{width}} {100 * drop:>9.2f} {recall:>10.3f} {harmonic(old_acc, recall):>8.3f} "
        f"{seconds:>8.2f}" + "".join(f" {v:>10.3f}" for v in extra)
    )


METHODS = {
    "graft": lambda b, f, r: graft(b, f, r).model,
    "uncalibrated": lambda b, f, r: graft(b, f, r, calibration=Calibration("none")).model,
    "sgd": lambda b, f, r: graft(b, f, r, solver="sgd").model,
    "imprint": lambda b, f, r: graft(b, f, r, HeadTraining(epochs=0), solver="sgd").model,
    "last_block": lambda b, f, r: (
        graft(b, f, r, HeadTraining(epochs=10, old_rows_frozen=False), "last_block").model
    ),
    "none+lwf": lambda b, f, r: (
        graft(b, f, r, HeadTraining(epochs=10, old_rows_frozen=False), "none").model
    ),
    "logreg": logreg,
    "seed-style": seed_style,
    "full-ft": full_finetune,
}
LIGHT = ["graft", "uncalibrated", "logreg", "seed-style"]  # on the bases after the first


def table_shots(bench: Bench, base: Base, shots_list: list[int], methods: list[str] | None) -> None:
    chosen = {name: METHODS[name] for name in (methods or METHODS)}
    print(
        f"\n## shots: digits, base {base.name}: {ARCH} trained on 0-8, held-out old-class "
        f"accuracy {base.old_accuracy:.4f} ({base.counts}); 20 old images per class uploaded; "
        f"mean of {bench.seeds} seeds"
    )
    print(
        f"{'shots method':<22} {'drop (pts)':>9} {'new recall':>10} {'harmonic':>8} "
        f"{'time (s)':>8} {'hind@0.3':>10} {'hind@1.0':>10}"
    )
    for shots in shots_list:
        for name, method in chosen.items():
            rows = []
            for seed in range(bench.seeds):
                torch.manual_seed(seed)
                folders = bench.shots(seed, shots)
                with tempfile.TemporaryDirectory() as tmp:
                    started = time.perf_counter()
                    model = method(base.model, folders, Path(tmp))
                    elapsed = time.perf_counter() - started
                old_acc, recall, *ceilings = measure(model, base.x, base.y, base.old_accuracy)
                rows.append((base.old_accuracy - old_acc, recall, old_acc, elapsed, *ceilings))
            print(row(f"{shots:>5} {name}", rows), flush=True)


def _reference_folder(
    bench: Bench, base: Base, root: Path, method: str, per_label: int, seed: int
) -> Path:
    """``per_label`` of the 60 uploadable images of every old digit, picked as a job keeps
    its reference set: herding on the base model's features, or at random."""
    from engine.reference import Kept

    pool = D.write_image_folder(
        root / "pool", {str(d): bench.held.of(d)[:HOLDOUT_FROM] for d in OLD}
    )
    samples = scan_image_folder(pool)
    x = D.tensors([bench.held.of(int(s.label))[int(s.path.stem)] for s in samples])
    features = _features(base.model, x)
    candidates = [Kept(file_digest(s.path), s.label, s.path) for s in samples]
    kept = select_reference(candidates, features, per_label, method, seed)
    target = root / f"reference-{method}"
    for k in kept:
        (target / k.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(k.path, target / k.label / k.path.name)
    return target


def table_memory(bench: Bench, base: Base, shots: int = 10) -> None:
    print(
        f'\n## memory: base {base.name}; {shots} images of "9"; old labels from uploads or a '
        f"reference set; mean of {bench.seeds} seeds"
    )
    print(
        f"{'old-label images':<34} {'drop (pts)':>9} {'new recall':>10} {'harmonic':>8} "
        f"{'time (s)':>8} {'measured n':>10} {'unverified':>10}"
    )
    scenarios = ["20 per label uploaded", "none (new-label images only)"]
    for per_label in (20, 5):
        scenarios += [f"reference {per_label}/label, {m}" for m in ("random", "herding")]
    for scenario in scenarios:
        rows = []
        for seed in range(bench.seeds):
            folders = bench.shots(seed, shots)
            reference = None
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                if "only" in scenario or "reference" in scenario:
                    folders = {"9": folders["9"]}
                if "reference" in scenario:
                    method = scenario.rsplit(" ", 1)[-1]
                    per_label = int(scenario.split()[1].split("/")[0])
                    reference = _reference_folder(bench, base, root, method, per_label, seed)
                started = time.perf_counter()
                result = graft(base.model, folders, root, reference=reference)
                elapsed = time.perf_counter() - started
            old_acc, recall, *_ = measure(result.model, base.x, base.y, base.old_accuracy)
            n = result.metrics["old_classes"]["n"]
            rows.append((base.old_accuracy - old_acc, recall, old_acc, elapsed, n, float(n < 20)))
        print(row(scenario, rows, 34), flush=True)


def table_sequential(bench: Bench, base: Base, shots: int = 10, per_label: int = 20) -> None:
    first = list(range(8))
    model0 = train_base(base.digits, first, base.epochs)
    print(
        f"\n## sequential: base {base.name} recipe on 0-7 (held-out accuracy "
        f"{base.accuracy(model0, first):.4f}) with a reference set of {per_label} per digit; v2 "
        f'learns "8", v3 learns "9", {shots} images each and nothing else; each measured against '
        f"its parent (lineage: its fold layers); truth on the held-out images; {bench.seeds} seeds"
    )
    print(
        f"{'seed step':<10} {'drop 0-7':>8} {'recall':>6} {'n':>4} {'measured retention':>27} "
        f"{'true':>7} {'covered':>7}  gate"
    )
    covered, kept, promoted = [], 0, 0
    for seed in range(bench.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            reference = D.write_image_folder(
                root / "reference", {str(d): bench.held.of(d)[:per_label] for d in first}
            )
            model, labels, lineage = model0, [str(d) for d in first], None
            for digit in (8, 9):
                g = torch.Generator().manual_seed(seed * 10 + digit)
                pool = bench.held.of(digit)[:HOLDOUT_FROM]
                pick = torch.randperm(len(pool), generator=g)[:shots].tolist()
                work = root / f"v{digit - 6}"
                result = graft(
                    model,
                    {str(digit): [pool[i] for i in pick]},
                    work,
                    reference=reference,
                    labels=labels,
                    new=[str(digit)],
                    per_label=per_label,
                    lineage=lineage,
                )
                known = [int(x) for x in labels]
                before, after = base.right(model, known), base.right(result.model, known)
                truth = after.float().mean().item() / max(before.float().mean().item(), 1e-9)
                old = result.metrics["old_classes"]
                low, high = old["ci95"]["retention"]
                gate = decide(result.metrics, result.labels, len(labels))
                covered.append(low <= truth <= high)
                if truth >= 0.98:
                    kept += 1
                    promoted += gate["decision"] == "promoted"
                drop = base.accuracy(model0, first) - base.accuracy(result.model, first)
                print(
                    f"{seed:>4} v{digit - 6}+{digit} {100 * drop:>8.2f}"
                    f" {base.accuracy(result.model, [digit]):>6.3f} {old['n']:>4} "
                    f"{old['retention']:>8.4f} [{low:.4f}, {high:.4f}] {truth:>7.4f} "
                    f"{str(covered[-1]):>7}  {gate['decision']} ({gate['evidence']})",
                    flush=True,
                )
                model, labels, lineage = result.model, result.labels, result.lineage
                reference = _materialise(result.reference, [reference, work / "images"], work)
    print(
        f"intervals holding the held-out truth: {sum(covered)}/{len(covered)}; versions that "
        f"truly kept >= 98 % promoted: {promoted}/{kept}"
    )


def _materialise(kept, folders: list[Path], work: Path) -> Path:
    """A folder holding a kept reference set (its images found by digest in ``folders``)."""
    by_digest = {file_digest(p): p for f in folders for p in f.rglob("*") if p.is_file()}
    target = work / "kept"
    for k in kept:
        (target / k.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(by_digest[k.digest], target / k.label / f"{k.digest[:16]}.png")
    return target


def table_evidence(bench: Bench, base: Base, shots: int = 10, old_per_class: int = 20) -> None:
    print(
        f"\n## evidence: base {base.name}; what a job measured on its own images (cross-fitted; "
        f'{old_per_class} old images per digit, {shots} of "9") against the held-out truth; '
        f"{bench.seeds} seeds"
    )
    print(
        f"{'seed':>4} {'measured before':>15} {'true before':>11} {'measured drop':>13} "
        f"{'true drop':>9} {'retention 95% interval':>24} {'truth inside':>12} {'gate':>24}"
    )
    for seed in range(bench.seeds):
        folders = bench.shots(seed, shots, old_per_class)
        with tempfile.TemporaryDirectory() as tmp:
            result = graft(base.model, folders, Path(tmp))
        old = result.metrics["old_classes"]
        true_after = base.accuracy(result.model, OLD)
        true_retention = true_after / base.old_accuracy
        low, high = old["ci95"]["retention"]
        gate = decide(result.metrics, result.labels, len(OLD))
        print(
            f"{seed:>4} {old['accuracy_before']:>15.4f} {base.old_accuracy:>11.4f} "
            f"{100 * (old['accuracy_before'] - old['accuracy_after']):>13.2f} "
            f"{100 * (base.old_accuracy - true_after):>9.2f} {f'{low:.4f}-{high:.4f}':>24} "
            f"{str(low <= true_retention <= high):>12} "
            f"{gate['decision'] + ' (' + gate['evidence'] + ')':>24}",
            flush=True,
        )


GRID = {  # candidate defaults: (old_anchor, new_ridge, distillation, max_old_accuracy_drop)
    "as shipped": (0.03, 0.03, 0.01, 0.01),
    "anchor 0.1": (0.1, 0.03, 0.01, 0.01),
    "anchor 0.3": (0.3, 0.03, 0.01, 0.01),
    "anchor 1": (1.0, 0.03, 0.01, 0.01),
    "distil 0.1": (0.03, 0.03, 0.1, 0.01),
    "anchor 0.3 distil 0.1": (0.3, 0.03, 0.1, 0.01),
    "new ridge 0.1": (0.03, 0.1, 0.01, 0.01),
    "budget 0.02": (0.03, 0.03, 0.01, 0.02),
    "anchor 0.3 budget 0.02": (0.3, 0.03, 0.01, 0.02),
}


def table_defaults(bench: Bench, shots_list: tuple[int, ...] = (10, 2)) -> None:
    names = " ".join(f"{b.name:>19}" for b in bench.bases)
    print(
        f"\n## defaults: candidate ridges and calibration budgets on every base; drop (pts) / "
        f"new recall / harmonic mean, mean of {bench.seeds} seeds; 20 old images per class"
    )
    for shots in shots_list:
        print(f"{f'{shots} shots':<24} {names} {'mean harmonic':>14}")
        for label, (anchor, ridge, distil, budget) in GRID.items():
            refit = Refit(old_anchor=anchor, new_ridge=ridge, distillation=distil)
            cells, harmonics = [], []
            for base in bench.bases:
                rows = []
                for seed in range(bench.seeds):
                    with tempfile.TemporaryDirectory() as tmp:
                        result = graft(
                            base.model,
                            bench.shots(seed, shots),
                            Path(tmp),
                            calibration=Calibration(max_old_drop=budget),
                            refit=refit,
                        )
                    old_acc, recall, *_ = measure(result.model, base.x, base.y, base.old_accuracy)
                    rows.append((base.old_accuracy - old_acc, recall, old_acc))
                drop = statistics.mean(r[0] for r in rows)
                recall = statistics.mean(r[1] for r in rows)
                hm = harmonic(statistics.mean(r[2] for r in rows), recall)
                harmonics.append(hm)
                cells.append(f"{100 * drop:.2f}/{recall:.3f}/{hm:.3f}")
            print(
                f"{label:<24} "
                + " ".join(f"{c:>19}" for c in cells)
                + f" {statistics.mean(harmonics):>14.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10, 50])
    parser.add_argument(
        "--methods", nargs="+", help="methods of `shots` (default: all on the first base)"
    )
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    tables = ["shots", "memory", "sequential", "evidence", "defaults"]
    parser.add_argument("--tables", nargs="+", default=tables, choices=tables)
    args = parser.parse_args()
    bench = Bench(args.seeds, args.bases)
    for i, base in enumerate(bench.bases):
        print(
            f"base {base.name}: held-out old-class accuracy {base.old_accuracy:.4f} ({base.counts})"
        )
        if "shots" in args.tables:
            table_shots(bench, base, args.shots, args.methods or (None if i == 0 else LIGHT))
        if "memory" in args.tables and i == 0:
            table_memory(bench, base)
        if "sequential" in args.tables:
            table_sequential(bench, base)
        if "evidence" in args.tables:
            table_evidence(bench, base)
    if "defaults" in args.tables:
        table_defaults(bench)


if __name__ == "__main__":
    main()
