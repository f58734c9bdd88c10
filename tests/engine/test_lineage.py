"""Sequential versions measured without bias: a version keeps its fold layers and every image's
fold, and the next job scores each remembered image by a layer that never saw it."""

from __future__ import annotations

import statistics

import torch

from devkit.features import Memory, World, fit_base, grow
from engine.lineage import NEVER, Lineage, assign_folds, near_duplicates


def _sequence(seed: int, use_lineage: bool) -> tuple[float, float, bool]:
    """v1 (about 85 %) -> v2 learns 8 with a reference set -> v3 learns 9 from 10 images and
    v2's reference set. Returns v3's measured "before", the truth on the same label mix, and
    whether v3's retention interval holds the true retention."""
    world = World(separation=0.47, seed=seed)
    v1 = fit_base(world, list(range(8)), 40)
    rx, ry, rd = world.draw(dict.fromkeys(range(8), 20))
    sx, sy, sd = world.draw({8: 10})
    x, y, d = torch.cat([sx, rx]), torch.cat([sy, ry]), sd + rd
    v2 = grow(v1, None, x, y, d, 8, 1, seed)
    layer2 = (v2.layer.weight, v2.layer.bias)
    memory = Memory(x, y, d).capped(20)
    nx, ny, nd = world.draw({9: 10})
    x3, y3 = torch.cat([nx, memory.x]), torch.cat([ny, memory.y])
    v3 = grow(layer2, v2.lineage if use_lineage else None, x3, y3, nd + memory.digests, 9, 1, seed)
    measured = y3[v3.groups]
    weights = torch.bincount(measured[measured < 9], minlength=9).float()
    true_before = float((weights * world.recalls(layer2, list(range(9)))).sum() / weights.sum())
    layer3 = (v3.layer.weight, v3.layer.bias)
    true_after = float((weights * world.recalls(layer3, list(range(10)))[:9]).sum() / weights.sum())
    old = v3.metrics["old_classes"]
    low, high = old["ci95"]["retention"]
    return old["accuracy_before"], true_before, low <= true_after / true_before <= high


def test_a_later_job_measures_remembered_images_out_of_fold():
    honest = [_sequence(seed, use_lineage=True) for seed in range(6)]
    in_sample = [_sequence(seed, use_lineage=False) for seed in range(6)]
    bias = statistics.mean(m - t for m, t, _ in honest)
    inflated = statistics.mean(m - t for m, t, _ in in_sample)
    # scored by the layer fitted on them, the remembered images look ~13 points better than
    # the base is; by the fold layers that never saw them, they do not
    assert inflated > 0.08
    assert abs(bias) < 0.03
    assert sum(covered for *_, covered in honest) >= 5


def test_folds_are_inherited_by_digest_and_near_duplicates_stay_together():
    targets = torch.tensor([0] * 8 + [1] * 8)
    digests = [f"{i:064x}" for i in range(16)]
    inherited = {digests[0]: 3, digests[1]: NEVER, digests[9]: 0}
    folds = assign_folds(targets, digests, inherited, 5, seed=0, together=[[2, 3]])
    assert folds[0] == 3 and folds[1] == NEVER and folds[9] == 0
    assert folds[2] == folds[3]
    # fresh images of a label with more than `folds` of them: every fold gets some
    assert set(folds[8:].tolist()) == set(range(5))
    # near-duplicates remembered in two different folds cannot be measured honestly
    split = assign_folds(targets, digests, {digests[4]: 1, digests[5]: 2}, 5, 0, [[4, 5]])
    assert split[4] == split[5] == NEVER


def test_a_lineage_survives_its_file(tmp_path):
    digests = [f"{i:064x}" for i in range(5)]
    lineage = Lineage(
        2,
        torch.randn(2, 3, 4),
        torch.randn(2, 3),
        dict(zip(digests, [0, 1, -1, 0, 1], strict=True)),
    )
    lineage.save(tmp_path / "lineage.safetensors")
    back = Lineage.load(tmp_path / "lineage.safetensors")
    assert back.fold_of == lineage.fold_of and torch.equal(back.weight, lineage.weight)
    Lineage(fold_of={digests[0]: NEVER}).save(tmp_path / "tuned.safetensors")
    tuned = Lineage.load(tmp_path / "tuned.safetensors")
    assert not tuned.has_layers and tuned.fold_of == {digests[0]: NEVER}


def test_near_duplicates_are_found_by_their_offset_from_the_label():
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=generator) * 5  # every image of the label near it
    x = centre + torch.randn(12, 16, generator=generator)
    x[7] = x[3] + 0.05 * torch.randn(16, generator=generator)  # a second shot of image 3
    y = torch.zeros(12, dtype=torch.long)
    assert near_duplicates(x, y, 0.95) == [[3, 7]]
