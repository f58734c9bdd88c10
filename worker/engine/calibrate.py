"""Correct the new labels' logits against the old ones, on images the rows never saw.

The default (``auto``) is a brake, not a bet: a layer fitted on every label with real
negatives is left as it is, unless held-out logits show, beyond their noise, that the new labels
take more than ``max_old_drop`` of the old images; then the new logits are lowered by the least
that brings the share lost within it. Published corrections are there on request:

* weight aligning (WA, Zhao et al. 2020): rescale the new rows to the old rows' mean norm;
* bias correction (BiC, Wu et al. 2019): ``alpha * z + beta`` on every new logit ``z``, chosen
  by the harmonic mean of old- and new-class accuracy on held-out logits, among those that cost
  the old classes at most ``max_old_drop``; ties go to the one predicting new labels least.

All fold into the layer (``w' = alpha * w``, ``b' = alpha * b + beta``), so the exported model
is a plain linear layer. The *pool* of held-out logits holds every image, scored by a layer
refitted without it. A new label with fewer than ``min_new_evidence`` held-out images cannot
weigh in, so its logits may then only be lowered. A pool without old-class images cannot show
what a correction costs, so the layer stays as fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.evidence import wilson

METHODS = ("auto", "none", "weight_aligning", "bias_correction")
_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class Calibration:
    method: str = "auto"  # auto | none | weight_aligning | bias_correction
    max_old_drop: float = 0.01  # largest loss of pooled old-class accuracy a correction may cost
    folds: int = 3  # cross-fitting rounds for the pool when nothing else gives one
    # Held-out images a new label needs in the pool before a correction may favour it; with
    # fewer, a correction may only lower the new logits, as far as protecting old labels needs.
    min_new_evidence: int = 5


@dataclass(frozen=True)
class Pool:
    """Logits of held-out images, each from a classifier layer that never trained on them."""

    logits: torch.Tensor  # (n, num_classes)
    targets: torch.Tensor  # (n,)

    @staticmethod
    def concat(pools: list[Pool], num_classes: int) -> Pool:
        if not pools:
            return Pool(torch.empty(0, num_classes), torch.empty(0, dtype=torch.long))
        return Pool(torch.cat([p.logits for p in pools]), torch.cat([p.targets for p in pools]))


@dataclass(frozen=True)
class Choice:
    method: str
    alpha: float
    beta: float
    old_accuracy: float | None  # on the pool
    new_accuracy: float | None
    pool_old: int
    pool_new: int
    limited: bool = False  # too few held-out images of a new label to favour it

    def as_metrics(self) -> dict:
        return {
            "method": self.method,
            "alpha": round(self.alpha, 6),
            "beta": round(self.beta, 6),
            "limited": self.limited,
            "pool": {"old": self.pool_old, "new": self.pool_new},
            "pool_old_accuracy": self.old_accuracy,
            "pool_new_accuracy": self.new_accuracy,
        }


def weight_aligning_scale(weight: torch.Tensor, num_old: int) -> float:
    """WA's ``alpha``: the old rows' mean norm over the new rows' mean norm."""
    new_norm = weight[num_old:].norm(dim=1).mean()
    if not num_old or new_norm == 0:
        return 1.0
    return float(weight[:num_old].norm(dim=1).mean() / new_norm)


def fold_into_layer(
    weight: torch.Tensor, bias: torch.Tensor, num_old: int, alpha: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer whose new logits are ``alpha * z + beta``; old rows untouched."""
    weight, bias = weight.clone(), bias.clone()
    weight[num_old:] *= alpha
    bias[num_old:] = bias[num_old:] * alpha + beta
    return weight, bias


def calibrate(
    weight: torch.Tensor,
    num_old: int,
    pool: Pool,
    cfg: Calibration,
    shift: bool = True,
    limited: bool = False,
) -> Choice:
    """Choose ``(alpha, beta)`` for the new logits of ``pool`` (computed with ``weight``).
    Without ``shift`` (a classifier layer with no bias to hold it) ``beta`` stays 0.

    ``limited``: some new label has too few held-out images for its accuracy to weigh in. The
    new logits may then only be lowered (``alpha`` 1, ``beta`` <= 0), by the least that keeps
    pooled old-class accuracy within ``max_old_drop`` of what it can be: a brake that protects
    the old labels, never a bet on the new ones."""
    if shift and (cfg.method == "auto" or (limited and cfg.method == "bias_correction")):
        return _brake(num_old, pool, cfg, limited)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown calibration {cfg.method!r}; expected one of {METHODS}")
    wa = weight_aligning_scale(weight, num_old)
    fixed = {"none": [("none", 1.0)], "weight_aligning": [("weight_aligning", wa)]}
    fitted = [("bias_correction", a) for a in sorted({*_ALPHAS, round(wa, 6)})]
    plan = {
        "none": fixed["none"],
        "weight_aligning": fixed["weight_aligning"],
        "bias_correction": fitted,
        "auto": fixed["none"] + fixed["weight_aligning"] + fitted,
    }[cfg.method]
    old = pool.targets < num_old
    n_old, n_new = int(old.sum()), int((~old).sum())
    if not n_old and cfg.method != "weight_aligning":
        plan = fixed["none"]  # nothing shows what a shift would cost the old labels
    best_old = pool.logits[:, :num_old].max(dim=1)
    best_new = pool.logits[:, num_old:].max(dim=1)
    right_if_old = best_old.indices == pool.targets
    right_if_new = best_new.indices + num_old == pool.targets
    ceiling = right_if_old[old].float().mean().item() if n_old else None
    scored: list[tuple[tuple, Choice]] = []
    for method, alpha in plan:
        critical = best_old.values - alpha * best_new.values  # a new label wins iff beta > it
        fits_beta = method == "bias_correction" and shift
        betas = _cuts(critical) if fits_beta else torch.zeros(1)
        old_acc, new_acc, predicted_new = _sweep(critical, betas, old, right_if_old, right_if_new)
        for i, beta in enumerate(betas.tolist()):
            o = old_acc[i].item() if n_old else None
            n = new_acc[i].item() if n_new else None
            within = o is None or ceiling is None or o >= ceiling - cfg.max_old_drop - 1e-9
            hm = _harmonic(o, n) if within else -(ceiling - o)
            key = (within, round(hm, 9), -int(predicted_new[i]), -abs(alpha - 1.0) - abs(beta))
            scored.append((key, Choice(method, alpha, beta, o, n, n_old, n_new)))
    return max(scored, key=lambda s: s[0])[1]


def _brake(num_old: int, pool: Pool, cfg: Calibration, limited: bool) -> Choice:
    """Lower the new logits only when the pool shows, beyond its noise, that new labels take
    more than ``max_old_drop`` of the old images: when even the lower end of the 95 % interval
    of the share lost exceeds it. Then by the least that brings the share lost within it."""
    old = pool.targets < num_old
    n_old, n_new = int(old.sum()), int((~old).sum())
    if not n_old:
        return Choice("none", 1.0, 0.0, None, None, n_old, n_new, limited=limited)
    best_old = pool.logits[:, :num_old].max(dim=1)
    best_new = pool.logits[:, num_old:].max(dim=1)
    right_if_old = best_old.indices == pool.targets
    right_if_new = best_new.indices + num_old == pool.targets
    critical = best_old.values - best_new.values
    betas = _cuts(critical)
    betas = torch.cat([betas[betas < 0], torch.zeros(1)])
    old_acc, new_acc, _ = _sweep(critical, betas, old, right_if_old, right_if_new)
    ceiling = right_if_old[old].float().mean().item()
    lost = round((ceiling - old_acc[-1].item()) * n_old)  # at beta = 0
    interval = wilson(lost, n_old)
    i = len(betas) - 1
    if interval is not None and interval[0] > cfg.max_old_drop:
        within = old_acc >= ceiling - cfg.max_old_drop - 1e-9
        i = int(torch.nonzero(within).max()) if bool(within.any()) else int(old_acc.argmax())
    beta = float(betas[i])
    o = old_acc[i].item()
    n = new_acc[i].item() if n_new else None
    method = "none" if beta == 0 else "brake"
    return Choice(method, 1.0, beta, o, n, n_old, n_new, limited=limited)


def _sweep(
    critical: torch.Tensor,
    betas: torch.Tensor,
    old: torch.Tensor,
    right_if_old: torch.Tensor,
    right_if_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Old accuracy, new accuracy and the number of new predictions at every beta, in
    O(n log n): sorted by critical value, the images predicted new are a prefix."""
    order = torch.argsort(critical)
    sorted_critical = critical[order]
    k = torch.searchsorted(sorted_critical, betas)  # images whose critical value is < beta
    is_old = old[order].double()
    gain = right_if_new[order].double() - right_if_old[order].double()
    zero = torch.zeros(1, dtype=torch.float64)
    old_gain = torch.cat([zero, torch.cumsum(gain * is_old, 0)])[k]
    new_gain = torch.cat([zero, torch.cumsum(gain * (1 - is_old), 0)])[k]
    n_old, n_new = is_old.sum(), (1 - is_old).sum()
    old_base = (right_if_old & old).sum().double()
    new_base = (right_if_old & ~old).sum().double()
    old_acc = (old_base + old_gain) / n_old.clamp(min=1)
    new_acc = (new_base + new_gain) / n_new.clamp(min=1)
    return old_acc, new_acc, k


def _cuts(critical: torch.Tensor) -> torch.Tensor:
    """Every shift at which some pooled image changes between an old and a new prediction:
    one beta between each pair of neighbouring critical values, and one beyond each end."""
    if not len(critical):
        return torch.zeros(1)
    values = torch.sort(critical.unique()).values
    mids = values[:-1] + torch.diff(values) / 2
    return torch.cat([values[:1] - 1.0, mids, values[-1:] + 1.0])


def _harmonic(old: float | None, new: float | None) -> float:
    if old is None or new is None:
        return old if old is not None else (new or 0.0)
    return 2 * old * new / (old + new) if old + new else 0.0
