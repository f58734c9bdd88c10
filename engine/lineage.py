"""What a version's classifier layer was fitted on, so that every later job scores those images
by a layer that never saw them.

A job measures each image by cross-fitting: ``K`` refits of the layer, each without one *fold*
of the images. A version keeps those fold layers and the fold of every image it was fitted on,
by digest: its *lineage*. A job on that version keeps each remembered image in its fold and
anchors its own fold-``k`` refit to the base's fold-``k`` layer. Then no layer that scores a
fold-``k`` image, in this generation or any before it, was fitted on that image: "before" (the
base's fold layer) and "after" (the job's) are both honest, however many versions deep.

Without that, a version's reference set is mostly the images its own layer was fitted on, and
the next job's "before" is scored in-sample: optimistic, so retention looks worse than it is
(bench/quality.py's sequential table measures both).

An image a layer saw in every fold (a one- or two-shot label's last image, everything under a
fine-tuned backbone) is ``NEVER``: later jobs train on it but cannot measure on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

NEVER = -1  # an image every fold layer saw: trained on, never measured


@dataclass
class Lineage:
    folds: int = 0  # 0: no fold layers (a registered model, a fine-tuned backbone)
    weight: torch.Tensor | None = None  # [folds, classes, features], calibrated fold layers
    bias: torch.Tensor | None = None  # [folds, classes]
    fold_of: dict[str, int] = field(default_factory=dict)  # digest -> fold, or NEVER

    @property
    def has_layers(self) -> bool:
        return self.folds > 0 and self.weight is not None

    def layer(self, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.weight is not None and self.bias is not None
        return self.weight[fold], self.bias[fold]

    @property
    def seen(self) -> int:
        return len(self.fold_of)

    def save(self, path: Path) -> None:
        """One safetensors file: the fold layers, and every digest with its fold."""
        digests = sorted(self.fold_of)
        raw = np.frombuffer(b"".join(bytes.fromhex(d) for d in digests), dtype=np.uint8)
        tensors = {
            "digests": torch.from_numpy(raw.reshape(-1, 32).copy()),
            "fold": torch.tensor([self.fold_of[d] for d in digests], dtype=torch.int8),
        }
        if self.has_layers:
            tensors["weight"] = self.weight.float().contiguous()
            tensors["bias"] = self.bias.float().contiguous()
        safetensors.torch.save_file(
            tensors, str(path), metadata={"folds": json.dumps(self.folds if self.has_layers else 0)}
        )

    @staticmethod
    def load(path: Path) -> Lineage:
        with safetensors.safe_open(str(path), framework="pt") as f:
            folds = int(json.loads(f.metadata()["folds"]))
            names = set(f.keys())
            digests = f.get_tensor("digests")
            fold = f.get_tensor("fold").tolist()
            weight = f.get_tensor("weight") if "weight" in names else None
            bias = f.get_tensor("bias") if "bias" in names else None
        raw = digests.numpy().tobytes()
        fold_of = {raw[32 * i : 32 * i + 32].hex(): k for i, k in enumerate(fold)}
        return Lineage(folds if weight is not None else 0, weight, bias, fold_of)


def assign_folds(
    targets: torch.Tensor,
    digests: list[str],
    inherited: dict[str, int],
    folds: int,
    seed: int,
    together: list[list[int]] | None = None,
) -> torch.Tensor:
    """The fold of every image (its index in ``targets``), or ``NEVER``.

    Images the base version remembers keep their fold. The others are dealt round-robin within
    each label, so that every fold holds every label; a label with no more fresh images than
    folds keeps its last one out of every fold (its row needs an image to be fitted on).
    ``together``: groups of near-duplicates, dealt as one (a burst of shots of one scene would
    otherwise be measured by a layer fitted on its twin); if their remembered folds disagree,
    none of them can be measured honestly, so all are ``NEVER``."""
    n = len(targets)
    fold_of = torch.full((n,), NEVER, dtype=torch.long)
    units: list[list[int]] = [list(g) for g in together or []]
    grouped = {i for g in units for i in g}
    units += [[i] for i in range(n) if i not in grouped]
    fresh_by_label: dict[int, list[int]] = {}
    for u, members in enumerate(units):
        known = {inherited[digests[i]] for i in members if digests[i] in inherited}
        if not known:
            fresh_by_label.setdefault(int(targets[members[0]]), []).append(u)
            continue
        fold = known.pop() if len(known) == 1 else NEVER
        if fold >= folds:  # remembered under another number of folds: the base saw it
            fold = NEVER
        fold_of[members] = fold
    generator = torch.Generator().manual_seed(seed)
    for label in sorted(fresh_by_label):
        fresh = fresh_by_label[label]
        order = torch.randperm(len(fresh), generator=generator).tolist()
        for i, u in enumerate(fresh[j] for j in order):
            if len(fresh) > folds:
                fold_of[units[u]] = i % folds
            elif i < len(fresh) - 1:
                fold_of[units[u]] = i
    return fold_of


def near_duplicates(
    features: torch.Tensor, targets: torch.Tensor, threshold: float, chunk: int = 2048
) -> list[list[int]]:
    """Groups (two or more) of images of one label whose features are near-identical: the
    cosine of their offsets from the label's mean feature is at least ``threshold``. Offsets,
    not raw features: a trained backbone puts every image of a label in one narrow cone, but
    two shots of one scene share their offset too. Groups are the connected components of
    that relation, found by propagating the smallest index along it (vectorised: a label
    whose images all look alike costs a few matrix products, not a loop over its pairs)."""
    component = torch.arange(len(targets))
    for label in targets.unique().tolist():
        members = (targets == label).nonzero().flatten()
        if len(members) < 2:
            continue
        x = features[members].float()
        x = F.normalize(x - x.mean(dim=0), dim=1)
        least = torch.arange(len(members))
        while True:
            nxt = least.clone()
            for start in range(0, len(members), chunk):
                close = (x[start : start + chunk] @ x.T) >= threshold
                candidates = torch.where(close, least[None, :], len(members))
                nxt[start : start + chunk] = torch.minimum(
                    nxt[start : start + chunk], candidates.min(dim=1).values
                )
            if torch.equal(nxt, least):
                break
            least = nxt
        component[members] = members[least]
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(component.tolist()):
        groups.setdefault(c, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def near_duplicate_groups(
    features: torch.Tensor,
    clean_rows: torch.Tensor,
    targets: torch.Tensor,
    threshold: float,
    max_per_label: int,
) -> list[list[int]]:
    """``near_duplicates`` of the images (image ``g``'s features are row ``clean_rows[g]``)
    of every label with at most ``max_per_label`` images (pairwise comparison is quadratic);
    none when ``threshold`` is 1 or more."""
    if threshold >= 1 or not len(targets):
        return []
    small = torch.bincount(targets)[targets] <= max_per_label
    where = small.nonzero().flatten()
    found = near_duplicates(features[clean_rows[where]], targets[where], threshold)
    return [[int(where[i]) for i in group] for group in found]
