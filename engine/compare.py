"""Score versions of a model on one labelled image set, and compare them image by image.

Every version scores every image whose label it knows. Versions whose backbones give the same
features (the same weights outside the classifier layer, preprocessing and dtype: a lineage
grown in head mode) share one extraction pass; each then applies its own classifier layer to
the cached features, in float32.

What comes back, for each version: accuracy, macro F1, per-label precision, recall and F1, each
with the number of images it was counted on and a 95 % interval, the confusion matrix, and the
accuracy on the labels of the first version listed ("old") and on those it added ("new"). For
each pair of versions, on the images whose label both know: the paired outcomes (right under
both, lost, gained, wrong under both), the images whose prediction changed, the accuracy
difference with its interval and the exact McNemar test, Holm-adjusted over the pairs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from engine.data import ImageDataset, Sample, eval_transform
from engine.decoded import DecodedCache, filling
from engine.device import (
    backbone_dtype,
    compute_dtype,
    pick_device,
    precision_name,
    release_memory,
)
from engine.device_decode import DeviceBatches, plan
from engine.errors import JobCancelled
from engine.evaluate import classification_metrics
from engine.evidence import Paired, f1_interval, holm, mcnemar_exact, paired, wilson
from engine.features import FeatureCache, extract_features
from engine.preprocessing import Preprocessing
from engine.reference import backbone_fingerprint, file_digest
from engine.weights import load_classifier

CHANGED_SHOWN = 200  # images listed per pair; the counts cover them all


@dataclass(frozen=True)
class VersionFile:
    """A stored version to score."""

    version: int
    architecture: str
    labels: list[str]
    weights: Path
    preprocessing: Preprocessing


@dataclass(frozen=True)
class CompareConfig:
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    num_workers: int = 0
    feature_memory_bytes: int = 2 << 30
    spill_dir: Path | None = None
    alpha: float = 0.05
    decoded: DecodedCache | None = None  # the images' pixels kept between passes (decoded.py)
    decode: str = "auto"  # where the images are decoded: auto | device | loaders (device_decode)


@dataclass(frozen=True)
class Stage:
    stage: str  # loading | extracting | evaluating
    fraction: float
    message: str = ""


def compare_versions(
    versions: list[VersionFile],
    samples: list[Sample],
    cfg: CompareConfig,
    progress: Callable[[Stage], None] = lambda _: None,
    should_stop: Callable[[], bool] = lambda: False,
    digests: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score ``versions`` (in the order given; the first is the baseline) on ``samples``
    (``digests``: their files' sha256, where the caller has them; read again otherwise)."""
    if cfg.decoded is not None and digests is None:
        digests = [file_digest(s.path) for s in samples]
    started = time.perf_counter()
    device = pick_device(cfg.device)
    dtype = compute_dtype(device, cfg.precision)
    predicted: dict[int, torch.Tensor] = {}
    groups: dict[str, list[tuple[VersionFile, torch.Tensor, torch.Tensor | None]]] = {}
    backbones: dict[str, tuple[torch.nn.Module, Any, Preprocessing, torch.dtype]] = {}
    for i, v in enumerate(versions):
        progress(Stage("loading", i / len(versions), f"loading version {v.version}"))
        model, head = load_classifier(v.architecture, len(v.labels), v.weights)
        model.requires_grad_(False)
        runs_in = backbone_dtype(dtype, device, model)
        key = backbone_fingerprint(model, head, v.preprocessing, runs_in)
        bias = head.module.bias
        layer = (
            head.module.weight.detach().float().clone(),
            None if bias is None else bias.detach().float().clone(),
        )
        groups.setdefault(key, []).append((v, *layer))
        backbones.setdefault(key, (model, head, v.preprocessing, runs_in))
    known = {
        key: sorted({i for v, *_ in members for i in _known(samples, v.labels)})
        for key, members in groups.items()
    }
    passes, done_before = sum(len(k) for k in known.values()), 0
    # a pass each: what the decoded-pixels cache did, and where the images were decoded
    passes_log: dict[str, list[dict]] = {"decoded_cache": [], "decoding": []}
    try:
        with FeatureCache(cfg.feature_memory_bytes, cfg.spill_dir) as cache:
            for key, members in groups.items():
                model, head, prep, runs_in = backbones.pop(key)

                def on_batch(done: int, _total: int, base: int = done_before) -> None:
                    message = f"{base + done}/{passes} images"
                    progress(Stage("extracting", (base + done) / max(passes, 1), message))

                feats = _features(
                    model, head, prep, samples, known[key], cfg, device, runs_in, cache,
                    on_batch, should_stop, passes_log, digests,
                )  # fmt: skip
                done_before += len(known[key])
                del model
                rows = torch.tensor(known[key], dtype=torch.long)
                for v, weight, bias in members:
                    if should_stop():
                        raise JobCancelled()
                    logits = feats @ weight.T + (0 if bias is None else bias)
                    scores = torch.full((len(samples),), -1, dtype=torch.long)
                    scores[rows] = logits.argmax(1)
                    predicted[v.version] = scores
    finally:
        release_memory(device)
    progress(Stage("evaluating", 0.0, "measuring"))
    result = measure(versions, samples, predicted, cfg.alpha)
    result["timing"] = {"total_s": round(time.perf_counter() - started, 3)}
    result["device"], result["precision"] = str(device), precision_name(dtype)
    result["backbone_passes"] = len(groups)
    result.update(passes_log)
    return result


def _known(samples: list[Sample], labels: list[str]) -> list[int]:
    names = set(labels)
    return [i for i, s in enumerate(samples) if s.label in names]


def _features(
    model: torch.nn.Module,
    head: Any,
    prep: Preprocessing,
    samples: list[Sample],
    known: list[int],
    cfg: CompareConfig,
    device: torch.device,
    dtype: torch.dtype,
    cache: FeatureCache,
    on_batch: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    passes_log: dict[str, list[dict]],
    digests: Sequence[str] | None,
) -> torch.Tensor:
    """The classifier layer's inputs for ``samples[known]``, in that order."""
    picked = [samples[i] for i in known]
    decoding = plan(cfg.decode, device, prep)
    entry = None
    if cfg.decoded is not None and digests is not None:
        entry = cfg.decoded.entry([digests[i] for i in known], prep, decoding.decoder)
    stored = entry.rows if entry else None
    loader: DataLoader | DeviceBatches
    if decoding.on_device:
        loader = DeviceBatches(
            picked, prep, device, cfg.batch_size, cfg.num_workers, stored, decoding.jpeg_on_device
        )
    else:
        loader = DataLoader(
            ImageDataset(picked, prep, eval_transform(prep), decoded=stored),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
    with filling(entry):
        feats, order = extract_features(
            model, head, loader, device, on_batch, should_stop, cache.allocate, dtype
        )
    if entry:
        passes_log["decoded_cache"].append(entry.report())
    passes_log["decoding"].append(decoding.report([loader] if decoding.on_device else []))
    model.cpu()
    rows = torch.empty_like(order)
    rows[order] = torch.arange(len(order))
    return feats[rows]


def measure(
    versions: list[VersionFile],
    samples: list[Sample],
    predicted: dict[int, torch.Tensor],
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The figures of ``compare_versions`` from each version's predictions (label indices per
    sample, -1 where the version does not know the sample's label)."""
    baseline = set(versions[0].labels)
    per_version = [_version_metrics(v, samples, predicted[v.version], baseline) for v in versions]
    pairs = [
        _pair(a, b, samples, predicted, baseline)
        for i, a in enumerate(versions)
        for b in versions[i + 1 :]
    ]
    adjusted = holm([p["p_value"] for p in pairs])
    for p, q in zip(pairs, adjusted, strict=True):
        p["p_value_holm"] = q
        p["significant"] = q < alpha
        p["summary"] = _summary(p, alpha)
    counts = Counter(s.label for s in samples)
    return {
        "images": {
            "n": len(samples),
            "labels": dict(sorted(counts.items())),
        },
        "baseline_version": versions[0].version,
        "alpha": alpha,
        "versions": per_version,
        "comparisons": pairs,
    }


def _accuracy(right: int, n: int) -> dict[str, Any]:
    return {"accuracy": right / n if n else None, "n": n, "ci95": wilson(right, n)}


def _version_metrics(
    v: VersionFile, samples: list[Sample], scores: torch.Tensor, baseline: set[str]
) -> dict[str, Any]:
    index = {label: i for i, label in enumerate(v.labels)}
    known = [i for i, s in enumerate(samples) if s.label in index]
    truth = torch.tensor([index[samples[i].label] for i in known], dtype=torch.long)
    guess = scores[torch.tensor(known, dtype=torch.long)] if known else truth
    metrics = classification_metrics(truth, guess, v.labels)
    matrix = metrics["confusion_matrix"]["matrix"]
    for i, label in enumerate(v.labels):
        row = metrics["per_class"][label]
        tp = matrix[i][i]
        fn, fp = row["support"] - tp, row["predicted"] - tp
        row["ci95"]["f1"] = f1_interval(tp, fp, fn) if row["support"] else None
    right = truth == guess
    old = torch.tensor([samples[i].label in baseline for i in known], dtype=torch.bool)
    unscored = sorted({s.label for s in samples} - set(index))
    return {
        "version": v.version,
        "labels": list(v.labels),
        "overall": metrics["overall"],
        "old_labels": _accuracy(int(right[old].sum()), int(old.sum())),
        "new_labels": _accuracy(int(right[~old].sum()), int((~old).sum())),
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "unscored": {
            "n": sum(1 for s in samples if s.label not in index),
            "labels": unscored,
        },
    }


def _pair(
    a: VersionFile,
    b: VersionFile,
    samples: list[Sample],
    predicted: dict[int, torch.Tensor],
    baseline: set[str],
) -> dict[str, Any]:
    both = set(a.labels) & set(b.labels)
    common = [i for i, s in enumerate(samples) if s.label in both]
    pa, pb = predicted[a.version], predicted[b.version]
    right_a = [a.labels[int(pa[i])] == samples[i].label for i in common]
    right_b = [b.labels[int(pb[i])] == samples[i].label for i in common]
    outcome = paired(right_a, right_b)
    old = [k for k, i in enumerate(common) if samples[i].label in baseline]
    on_old = paired([right_a[k] for k in old], [right_b[k] for k in old])
    changed = [
        {"path": samples[i].path.name, "label": samples[i].label, "a": la, "b": lb}
        for i in common
        if (la := a.labels[int(pa[i])]) != (lb := b.labels[int(pb[i])])
    ]
    return {
        "a": a.version,
        "b": b.version,
        "n": outcome.n,
        "labels": sorted(both),
        "accuracy_a": _accuracy(outcome.right_before, outcome.n),
        "accuracy_b": _accuracy(outcome.right_after, outcome.n),
        "difference": _difference(outcome),
        **outcome.as_dict(),
        "p_value": mcnemar_exact(outcome.lost, outcome.gained),
        "old_labels": {
            "n": on_old.n,
            **on_old.as_dict(),
            "difference": _difference(on_old),
            "p_value": mcnemar_exact(on_old.lost, on_old.gained),
        },
        "changed": {"n": len(changed), "images": changed[:CHANGED_SHOWN]},
    }


def _difference(outcome: Paired) -> dict[str, Any]:
    """Accuracy of b minus accuracy of a on the same images, with a 95 % interval."""
    if not outcome.n:
        return {"value": None, "ci95": None}
    return {
        "value": (outcome.gained - outcome.lost) / outcome.n,
        "ci95": outcome.difference_interval(),
    }


def _summary(p: dict[str, Any], alpha: float) -> str:
    a, b, n = p["a"], p["b"], p["n"]
    if not n:
        return f"versions {a} and {b} share no labelled image: nothing to compare"
    diff = p["difference"]["value"]
    counts = (
        f"on the same {n} images, {p['gained']} went from wrong to right and {p['lost']} "
        f"from right to wrong"
    )
    if not p["significant"]:
        return (
            f"no significant difference between versions {a} and {b} ({counts}; "
            f"p = {p['p_value_holm']:.3g}, Holm-adjusted)"
        )
    better, worse = (b, a) if diff > 0 else (a, b)
    return (
        f"version {better} is more accurate than version {worse} by {abs(diff) * 100:.1f} "
        f"points ({counts}; p = {p['p_value_holm']:.3g}, Holm-adjusted)"
    )
