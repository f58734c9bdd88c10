"""Memory of the training stage when cached features do not fit the budget.

A job keeps what enters the classifier layer for every training view. Beyond
GRAFT_FEATURE_MEMORY_MB those features are memory-mapped from a file instead of held in
anonymous memory, so the kernel can page them out and a dataset larger than RAM still trains.

Here the features of real digit scans (a resnet18 trained on 0-8; 512 numbers per image) are
tiled, with a little noise, to N rows, written once through a FeatureCache, and then the
engine's training stage runs on them (rows imprinted, trained, cross-fitted, calibrated):
once with the features in memory, once spilled. Each run is a fresh process; a sampler reads
its anonymous resident memory (RssAnon: what cannot be paged out without swap) every 5 ms.

Prints seconds and peak anonymous memory of both, and the ratios, measured in one run.
`.venv/bin/python bench/memory.py [--rows N] [--epochs E]`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(rows: int, epochs: int, spill: bool, features_path: str) -> dict:
    """One training stage in this process; returns seconds and peak RssAnon."""
    import torch

    from engine.calibrate import Calibration
    from engine.features import FeatureCache
    from engine.recipe import LayerRecipe, Rows
    from engine.train import HeadTraining

    saved = torch.load(features_path)
    real, targets, weight, bias = saved["x"], saved["y"], saved["w"], saved["b"]
    del saved
    training = HeadTraining(epochs=epochs, batch_size=256)
    baseline = rss_anon_mb()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    budget = 0 if spill else 1 << 40
    spill_root = Path(__file__).resolve().parent.parent / "var"  # on disk, not a tmpfs
    spill_root.mkdir(exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=spill_root) as tmp,
        FeatureCache(budget, Path(tmp)) as cache,
    ):
        x = cache.allocate(rows, real.shape[1])
        generator = torch.Generator().manual_seed(0)
        y = torch.empty(rows, dtype=torch.long)
        for start in range(0, rows, 8192):
            n = min(8192, rows - start)
            pick = torch.randint(len(real), (n,), generator=generator)
            noise = 0.05 * torch.randn(n, real.shape[1], generator=generator)
            x[start : start + n] = real[pick] + noise
            y[start : start + n] = targets[pick]
        every = torch.ones(rows, dtype=torch.bool)
        recipe = LayerRecipe(
            weight,
            bias,
            [weight.shape[0]],
            init="imprint",
            training=training,
            calibration=Calibration(),
        )
        recipe.fit(Rows(x, y, torch.arange(rows), every), folds=3)  # 3 refits + 1, calibrated
        disk = cache.spilled_bytes
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"seconds": seconds, "peak_anon_mb": peak[0] - baseline, "disk_mb": disk / 2**20}


def prepare(path: Path) -> None:
    """Real features: digit scans through a resnet18 trained on 0-8, the new label 9 included."""
    import torch

    from devkit import digits as D

    base_digits, held = D.load()
    model = D.train_base(base_digits, list(range(9)))
    with torch.inference_mode():
        x = D.tensors(held.images)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    torch.save(
        {
            "x": feats,
            "y": torch.tensor(held.targets),
            "w": head.weight.detach(),
            "b": head.bias.detach(),
        },
        path,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child", choices=["memory", "spill"])
    parser.add_argument("--features")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.rows, args.epochs, args.child == "spill", args.features)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features.pt"
        prepare(features)
        results = {}
        for mode in ("memory", "spill"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--features", str(features)]
                + ["--rows", str(args.rows), "--epochs", str(args.epochs)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    size_mb = args.rows * 512 * 4 / 2**20
    print(f"{args.rows} feature rows x 512 (float32, {size_mb:.0f} MiB), {args.epochs} epochs")
    print(f"{'features':<10} {'seconds':>8} {'peak anon MiB':>14} {'on disk MiB':>12}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['seconds']:>8.1f} {r['peak_anon_mb']:>14.0f} {r['disk_mb']:>12.0f}")
    m, s = results["memory"], results["spill"]
    print(
        f"spilled/in-memory: time {s['seconds'] / m['seconds']:.2f}x, "
        f"peak anonymous memory {s['peak_anon_mb'] / max(m['peak_anon_mb'], 1):.2f}x"
    )


if __name__ == "__main__":
    main()
