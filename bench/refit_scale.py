"""The layer's refit at scale: one cross-fitted fit of a classifier layer (the folds' refits,
then the layer's on every image, each calibrated) as a head-mode job runs it, on synthetic
features of a given size, on the CPU or a GPU.

Features are made, not extracted (extraction is bench/speed.py's subject): ``--images`` rows
of ``--features`` non-negative values (as pooled features are), drawn around one centre per
label, ``--old`` labels the layer knows (its rows: the centres, scaled) and ``--new`` it
learns. Prints each refit's L-BFGS iterations, loss evaluations, largest final gradient
component and seconds (what a job's ``metrics.refit`` holds), the whole fit's seconds and peak
memory, and the seconds per loss evaluation: a pass over every row, the unit the fit's cost
grows by with the number of images. With ``--project N`` it also prints what the same fit
would take on N images, at the evaluations measured here (a projection, said as one).

  .venv/bin/python bench/refit_scale.py --images 10000 --project 100000
  .venv/bin/python bench/refit_scale.py --device cuda --images 100000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.expand import ExpansionConfig  # noqa: E402
from engine.recipe import LayerRecipe, Rows  # noqa: E402


def synthetic(images: int, features: int, old: int, new: int, seed: int) -> tuple:
    """Rows of ``images`` images (one view each) over ``old + new`` labels, and an old layer."""
    generator = torch.Generator().manual_seed(seed)
    labels = old + new
    centres = torch.rand(labels, features, generator=generator) * 2
    y = torch.arange(images) % labels
    x = torch.empty(images, features)
    for start in range(0, images, 8192):  # in chunks: no second copy of the matrix
        part = y[start : start + 8192]
        noise = torch.randn(len(part), features, generator=generator)
        x[start : start + 8192] = (centres[part] + noise).clamp_(min=0)
    weight = centres[:old] - centres[:old].mean(0)
    bias = torch.zeros(old)
    groups = torch.arange(images)
    rows = Rows(x, y, groups, torch.ones(images, dtype=torch.bool))
    return rows, weight, bias


def peak_memory(device: torch.device) -> str:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(device) / 2**30
        return f"{gpu:.2f} GiB on the GPU, {host:.1f} GiB host"
    return f"{host:.1f} GiB host (peak resident)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--old", type=int, default=1000)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--project", type=int, default=0, help="images to project the fit to")
    args = parser.parse_args()
    device = torch.device(args.device)
    made = time.perf_counter()
    rows, weight, bias = synthetic(args.images, args.features, args.old, args.new, args.seed)
    print(
        f"{args.images:,} images x {args.features:,} features, {args.old:,} old + {args.new:,} "
        f"new labels, {args.folds} folds, on {device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads); features made in "
        f"{time.perf_counter() - made:.1f} s"
    )
    cfg = ExpansionConfig()
    labels = args.old + args.new
    recipe = LayerRecipe(
        weight,
        bias,
        list(range(args.old, labels)),
        init=cfg.init,
        training=cfg.training,
        calibration=cfg.calibration,
        images=torch.bincount(rows.y, minlength=labels),
        solver=cfg.solver,
        refit=cfg.refit,
        device=device,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    recipe.fit(rows, args.folds)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - started
    print(
        f"{'refit':>6} {'rows':>9} {'iterations':>10} {'evaluations':>11} {'grad max':>9} {'s':>8}"
    )
    for i, solve in enumerate(recipe.solves):
        name = "layer" if i == len(recipe.solves) - 1 else f"fold {i + 1}"
        print(
            f"{name:>6} {solve.rows:>9,} {solve.iterations:>10} {solve.evaluations:>11} "
            f"{solve.gradient_max:>9.2g} {solve.seconds:>8.1f}"
        )
    solving = sum(s.seconds for s in recipe.solves)
    row_passes = sum(s.evaluations * s.rows for s in recipe.solves)  # rows read, all passes
    per_row = solving / max(row_passes, 1)
    per_refit = sum(s.evaluations for s in recipe.solves) / len(recipe.solves)
    print(
        f"cross-fitted fit: {total:.1f} s in all ({solving:.1f} s in the refits, whitening "
        f"included; the rest calibrating and scoring); peak memory {peak_memory(device)}"
    )
    print(f"a loss evaluation over 1,000 rows: {per_row * 1000 * 1000:.1f} ms")
    if args.project:
        # the folds' refits read (folds - 1) / folds of the rows each, the layer's all of them
        projected = per_row * args.project * args.folds * per_refit
        print(
            f"projected to {args.project:,} images: {args.folds + 1} refits at the "
            f"{per_refit:.0f} evaluations a refit took here, about {projected / 60:.0f} "
            f"minutes on {device} (a projection: the evaluations a fit needs change with the "
            "data)"
        )


if __name__ == "__main__":
    main()
