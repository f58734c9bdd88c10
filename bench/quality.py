"""Quality of label expansion on real scans: scikit-learn's digits.

A resnet18 is trained from scratch on the digits 0-8; then "9" is added. Every figure is
measured on held-out images that no job saw (``held.of(d)[60:]``); jobs draw their images from
``held.of(d)[:60]``. Mean of ``--seeds`` draws.

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
set (capped at 20 per label).

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
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import digits as D  # noqa: E402
from worker.engine.calibrate import Calibration  # noqa: E402
from worker.engine.data import scan_image_folder  # noqa: E402
from worker.engine.evidence import retention_gate  # noqa: E402
from worker.engine.expand import ExpansionConfig, ExpansionRequest, expand_classifier  # noqa: E402
from worker.engine.features import extract_features  # noqa: E402
from worker.engine.heads import expand_head, find_head  # noqa: E402
from worker.engine.reference import ReferenceSet, file_digest, select_reference  # noqa: E402
from worker.engine.train import HeadTraining  # noqa: E402

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
    )
    weights = _save(base, root / "base.safetensors")
    memory = ReferenceSet.from_folder(reference) if reference else None
    request = ExpansionRequest(ARCH, labels, weights, D.PREP, samples, new, config, memory)
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
    from worker.engine.architectures import build_model

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


def train_base(digits, classes):
    """The base model, the same run after run: one thread (parallel reductions reorder sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return D.train_base(digits, classes, ARCH)
    finally:
        torch.set_num_threads(threads)


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0


class Bench:
    def __init__(self, seeds: int) -> None:
        self.seeds = seeds
        base_digits, self.held = D.load()
        self.base_digits = base_digits
        self.base = train_base(base_digits, OLD)
        holdout = [(im, d) for d in range(10) for im in self.held.of(d)[HOLDOUT_FROM:]]
        self.x = D.tensors([im for im, _ in holdout])
        self.y = torch.tensor([d for _, d in holdout])
        self.base_old = self.accuracy(self.base, OLD)

    def accuracy(self, model, digits: list[int]) -> float:
        mask = torch.isin(self.y, torch.tensor(digits))
        with torch.inference_mode():
            predicted = model(self.x[mask]).argmax(1)
        return (predicted == self.y[mask]).float().mean().item()

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


def table_shots(bench: Bench, shots_list: list[int], methods: list[str] | None) -> None:
    all_methods = {
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
    chosen = {name: all_methods[name] for name in (methods or all_methods)}
    print(
        f"\n## shots: digits, {ARCH} trained on 0-8, held-out old-class accuracy "
        f"{bench.base_old:.4f} ({int((bench.y < 9).sum())} old, {int((bench.y == 9).sum())} new "
        f"held-out images); 20 old images per class uploaded; mean of {bench.seeds} seeds"
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
                    model = method(bench.base, folders, Path(tmp))
                    elapsed = time.perf_counter() - started
                old_acc, recall, *ceilings = measure(model, bench.x, bench.y, bench.base_old)
                rows.append((bench.base_old - old_acc, recall, old_acc, elapsed, *ceilings))
            print(row(f"{shots:>5} {name}", rows), flush=True)


def _reference_folder(bench: Bench, root: Path, method: str, per_label: int, seed: int) -> Path:
    """``per_label`` of the 60 uploadable images of every old digit, picked as a job keeps
    its reference set: herding on the base model's features, or at random."""
    from worker.engine.reference import Kept

    pool = D.write_image_folder(
        root / "pool", {str(d): bench.held.of(d)[:HOLDOUT_FROM] for d in OLD}
    )
    samples = scan_image_folder(pool)
    x = D.tensors([bench.held.of(int(s.label))[int(s.path.stem)] for s in samples])
    features = _features(bench.base, x)
    candidates = [Kept(file_digest(s.path), s.label, s.path) for s in samples]
    kept = select_reference(candidates, features, per_label, method, seed)
    target = root / f"reference-{method}"
    for k in kept:
        (target / k.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(k.path, target / k.label / k.path.name)
    return target


def table_memory(bench: Bench, shots: int = 10) -> None:
    print(
        f'\n## memory: {shots} images of "9"; old labels from uploads or a reference set; '
        f"mean of {bench.seeds} seeds"
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
                    reference = _reference_folder(bench, root, method, per_label, seed)
                started = time.perf_counter()
                result = graft(bench.base, folders, root, reference=reference)
                elapsed = time.perf_counter() - started
            old_acc, recall, *_ = measure(result.model, bench.x, bench.y, bench.base_old)
            n = result.metrics["old_classes"]["n"]
            rows.append((bench.base_old - old_acc, recall, old_acc, elapsed, n, float(n < 20)))
        print(row(scenario, rows, 34), flush=True)


def table_sequential(bench: Bench, shots: int = 10, per_label: int = 20) -> None:
    base = train_base(bench.base_digits, list(range(8)))
    first = list(range(8))
    base_first = bench.accuracy(base, first)
    print(
        f"\n## sequential: base on 0-7 (held-out accuracy {base_first:.4f}) with a reference set "
        f'of {per_label} per digit; v2 learns "8", v3 learns "9", {shots} images each and '
        f"nothing else; mean of {bench.seeds} seeds"
    )
    print(
        f"{'step':<22} {'drop 0-7 (pts)':>14} {'recall 8':>9} {'recall 9':>9} {'measured n':>10} "
        f"{'gate':>16}"
    )
    steps: dict[str, list[tuple]] = {"v2 (+8)": [], "v3 (+9)": []}
    for seed in range(bench.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            reference = D.write_image_folder(
                root / "reference", {str(d): bench.held.of(d)[:per_label] for d in first}
            )
            model, labels = base, [str(d) for d in first]
            for step, digit in zip(steps, (8, 9), strict=True):
                g = torch.Generator().manual_seed(seed * 10 + digit)
                pool = bench.held.of(digit)[:HOLDOUT_FROM]
                pick = torch.randperm(len(pool), generator=g)[:shots].tolist()
                work = root / step.split()[0]
                result = graft(
                    model,
                    {str(digit): [pool[i] for i in pick]},
                    work,
                    reference=reference,
                    labels=labels,
                    new=[str(digit)],
                    per_label=per_label,
                )
                model, labels = result.model, result.labels
                reference = _materialise(result.reference, [reference, work / "images"], work)
                drop = base_first - bench.accuracy(model, first)
                recalls = [bench.accuracy(model, [d]) if str(d) in labels else 0.0 for d in (8, 9)]
                old = result.metrics["old_classes"]
                decision = retention_gate(old, 0.98, 20)["decision"]
                steps[step].append((drop, *recalls, old["n"], decision))
    for step, rows in steps.items():
        means = [statistics.mean(r[i] for r in rows) for i in range(4)]
        decisions = ", ".join(f"{n} {d}" for d, n in Counter(r[4] for r in rows).items())
        print(
            f"{step:<22} {100 * means[0]:>14.2f} {means[1]:>9.3f} {means[2]:>9.3f} "
            f"{means[3]:>10.0f} {decisions:>16}",
            flush=True,
        )


def _materialise(kept, folders: list[Path], work: Path) -> Path:
    """A folder holding a kept reference set (its images found by digest in ``folders``)."""
    by_digest = {file_digest(p): p for f in folders for p in f.rglob("*") if p.is_file()}
    target = work / "kept"
    for k in kept:
        (target / k.label).mkdir(parents=True, exist_ok=True)
        shutil.copy(by_digest[k.digest], target / k.label / f"{k.digest[:16]}.png")
    return target


def table_evidence(bench: Bench, shots: int = 10, old_per_class: int = 20) -> None:
    print(
        f"\n## evidence: what a job measured on its own images (cross-fitted; {old_per_class} "
        f'old images per digit, {shots} of "9") against the held-out truth; '
        f"{bench.seeds} seeds"
    )
    print(
        f"{'seed':>4} {'measured before':>15} {'true before':>11} {'measured drop':>13} "
        f"{'true drop':>9} {'retention 95% interval':>24} {'truth inside':>12} {'gate':>20}"
    )
    for seed in range(bench.seeds):
        folders = bench.shots(seed, shots, old_per_class)
        with tempfile.TemporaryDirectory() as tmp:
            result = graft(bench.base, folders, Path(tmp))
        old = result.metrics["old_classes"]
        true_after = bench.accuracy(result.model, OLD)
        true_retention = true_after / bench.base_old
        low, high = old["ci95"]["retention"]
        gate = retention_gate(old, 0.98, 20)
        print(
            f"{seed:>4} {old['accuracy_before']:>15.4f} {bench.base_old:>11.4f} "
            f"{100 * (old['accuracy_before'] - old['accuracy_after']):>13.2f} "
            f"{100 * (bench.base_old - true_after):>9.2f} {f'{low:.4f}-{high:.4f}':>24} "
            f"{str(low <= true_retention <= high):>12} "
            f"{gate['decision'] + ' (' + gate['evidence'] + ')':>20}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10, 50])
    parser.add_argument("--methods", nargs="+", help="a subset of the methods of `shots`")
    parser.add_argument(
        "--tables",
        nargs="+",
        default=["shots", "memory", "sequential", "evidence"],
        choices=["shots", "memory", "sequential", "evidence"],
    )
    args = parser.parse_args()
    bench = Bench(args.seeds)
    if "shots" in args.tables:
        table_shots(bench, args.shots, args.methods)
    if "memory" in args.tables:
        table_memory(bench)
    if "sequential" in args.tables:
        table_sequential(bench)
    if "evidence" in args.tables:
        table_evidence(bench)


if __name__ == "__main__":
    main()
