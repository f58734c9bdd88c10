"""A world of features whose truth is known: Gaussian classes around random means, a base layer
fitted on a sample of them, and jobs run through the engine's own cross-fitting.

Real images cannot say what a version's accuracy truly is (a held-out split has its own noise);
here the truth is measured on as many fresh draws as wanted, so the coverage of an interval and
the operating characteristics of a rule can be counted. The base's accuracy is set by how far
apart the class means lie.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.calibrate import Calibration
from engine.crossfit import Measured, cross_fit
from engine.evaluate import expansion_metrics
from engine.lineage import Lineage
from engine.recipe import LayerRecipe, Rows
from engine.train import HeadTraining

Layer = tuple[torch.Tensor, torch.Tensor]


@dataclass
class World:
    classes: int = 10
    dim: int = 48
    separation: float = 0.5  # scale of the class means: the base's accuracy grows with it
    seed: int = 0
    means: torch.Tensor = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.means = torch.randn(self.classes, self.dim, generator=self.generator)
        self.means *= self.separation

    def draw(self, per_label: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Fresh images: features, labels and digests (every draw is a new image)."""
        ys = [torch.full((n,), label) for label, n in per_label.items()]
        y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
        x = self.means[y] + torch.randn(len(y), self.dim, generator=self.generator)
        return x, y, [secrets.token_hex(32) for _ in range(len(y))]

    def accuracy(self, layer: Layer, labels: list[int], n: int = 4000) -> float:
        """The layer's true accuracy on ``labels`` (its argmax over all its outputs)."""
        return float(self.recalls(layer, labels, n).mean())

    def recalls(self, layer: Layer, labels: list[int], n: int = 4000) -> torch.Tensor:
        """The layer's true recall of each of ``labels``."""
        x, y, _ = self.draw(dict.fromkeys(labels, n))
        right = ((x @ layer[0].T + layer[1]).argmax(dim=1) == y).float()
        return torch.stack([right[y == label].mean() for label in labels])


def fit_base(world: World, labels: list[int], per_label: int, ridge: float = 1e-3) -> Layer:
    """A softmax layer trained on a sample of ``labels``: the model a user registers."""
    x, y, _ = world.draw(dict.fromkeys(labels, per_label))
    weight = torch.zeros(len(labels), world.dim, requires_grad=True)
    bias = torch.zeros(len(labels), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + ridge * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@dataclass
class Memory:
    """A version's remembered images (its reference set), as features."""

    x: torch.Tensor
    y: torch.Tensor
    digests: list[str]

    def capped(self, per_label: int) -> Memory:
        keep = []
        for label in self.y.unique().tolist():
            keep += (self.y == label).nonzero().flatten()[:per_label].tolist()
        index = torch.tensor(sorted(keep), dtype=torch.long)
        return Memory(self.x[index], self.y[index], [self.digests[i] for i in index])


def grow(
    base: Layer,
    lineage: Lineage | None,
    x: torch.Tensor,
    y: torch.Tensor,
    digests: list[str],
    num_old: int,
    new: int,
    seed: int = 0,
    calibration: Calibration | None = None,
) -> Measured:
    """A job on features: the base layer grown by ``new`` labels, as the engine fits and
    measures it (refit, calibration, cross-fitting in the base's lineage)."""
    classes = num_old + new
    counts = torch.bincount(y, minlength=classes)
    recipe = LayerRecipe(
        base[0],
        base[1],
        list(range(num_old, classes)),
        init="imprint",
        training=HeadTraining(old_rows_frozen=False, seed=seed),
        calibration=calibration or Calibration(),
        images=counts,
    )
    n = len(y)
    rows = Rows(x, y, torch.arange(n), torch.ones(n, dtype=torch.bool))
    labels = [str(c) for c in range(classes)]
    return cross_fit(
        recipe, rows, torch.arange(n), y, digests, labels, lineage or Lineage(), 5, seed
    )


def paired_metrics(
    outcomes: list[tuple[int, int, int, int, int]], new: list[tuple[int, int]]
) -> tuple[dict, list[str], int]:
    """``(metrics, labels, num_old)`` of a version whose old labels had the paired outcomes
    ``(label, both_right, lost, gained, both_wrong)`` and whose new labels had ``(hits, n)``
    (wrong answers go to the next label): what the gate sees, without a model."""
    num_old = len(outcomes)
    labels = [f"o{i}" for i in range(num_old)] + [f"n{i}" for i in range(len(new))]

    def wrong(c: int) -> int:
        return (c + 1) % len(labels)

    y: list[int] = []
    before: list[int] = []
    after: list[int] = []
    for c, right, lost, gained, both_wrong in outcomes:
        for b, a, count in ((c, c, right), (c, wrong(c), lost), (wrong(c), c, gained)):
            y += [c] * count
            before += [b] * count
            after += [a] * count
        y += [c] * both_wrong
        before += [wrong(c)] * both_wrong
        after += [wrong(c)] * both_wrong
    for i, (hits, n) in enumerate(new):
        c = num_old + i
        y += [c] * n
        before += [0] * n
        after += [c] * hits + [0] * (n - hits)
    metrics = expansion_metrics(
        torch.tensor(y), torch.tensor(before), torch.tensor(after), labels, num_old
    )
    return metrics, labels, num_old
