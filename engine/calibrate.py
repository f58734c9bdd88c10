"""Correct the new labels' logits against the old ones, on images the rows never saw.

The default (``auto``) is a brake, not a bet, whatever the layer: a layer fitted on every label
with real negatives is left as it is, unless held-out logits show, beyond their noise, that the
new labels take more than ``max_old_drop`` of the old images. Then each new label that takes
old images is lowered on its own (its logit shifted down, or scaled down on a layer without a
bias), by the least that brings its share within the budget the other new labels leave: a new
label that takes nothing is never touched. Published corrections are there on request:

* weight aligning (WA, Zhao et al. 2020): rescale the new rows to the old rows' mean norm;
* bias correction (BiC, Wu et al. 2019): ``alpha * z + beta`` on every new logit ``z``, chosen
  by the harmonic mean of old- and new-class accuracy on held-out logits, among those that cost
  the old classes at most ``max_old_drop``; ties go to the one predicting new labels least.

All fold into the layer (``w' = alpha * w``, ``b' = alpha * b + beta``, per new row), so the
exported model is a plain linear layer. The *pool* of held-out logits holds every image, scored
by a layer refitted without it. A new label with fewer than ``min_new_evidence`` held-out
images cannot weigh in, so a requested bias correction is then a brake. A pool without
old-class images cannot show what a correction costs, so the layer stays as fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.evidence import wilson

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


Scale = float | tuple[float, ...]  # one value for every new label, or one per new label


@dataclass(frozen=True)
class Choice:
    method: str
    alpha: Scale
    beta: Scale
    old_accuracy: float | None  # on the pool
    new_accuracy: float | None
    pool_old: int
    pool_new: int
    limited: bool = False  # too few held-out images of a new label to favour it

    def as_metrics(self) -> dict:
        return {
            "method": self.method,
            "alpha": _rounded(self.alpha),
            "beta": _rounded(self.beta),
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


def _rounded(value: Scale) -> float | list[float]:
    return round(value, 6) if isinstance(value, float) else [round(v, 6) for v in value]


def _per_row(value: Scale, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor that broadcasts over the new columns of ``like``."""
    return torch.as_tensor(value, dtype=like.dtype)


def fold_into_layer(
    weight: torch.Tensor, bias: torch.Tensor, num_old: int, alpha: Scale, beta: Scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer whose new logits are ``alpha * z + beta`` (per new row); old rows untouched."""
    weight, bias = weight.clone(), bias.clone()
    a = _per_row(alpha, weight)
    weight[num_old:] *= a[:, None] if a.ndim else a
    bias[num_old:] = bias[num_old:] * a + _per_row(beta, bias)
    return weight, bias


def layer_logits(logits: torch.Tensor, num_old: int, alpha: Scale, beta: Scale) -> torch.Tensor:
    """``logits`` of the uncorrected layer as the corrected layer gives them."""
    out = logits.clone()
    out[:, num_old:] = out[:, num_old:] * _per_row(alpha, out) + _per_row(beta, out)
    return out


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
    if cfg.method == "auto" or (limited and cfg.method == "bias_correction"):
        return _brake(num_old, pool, cfg, limited, shift)
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


def _brake(num_old: int, pool: Pool, cfg: Calibration, limited: bool, shift: bool) -> Choice:
    """Lower new labels only when the pool shows, beyond its noise, that they take more than
    ``max_old_drop`` of the old images: when even the lower end of the 95 % interval of the
    share lost exceeds it. Then each label on its own, by the least that brings the images it
    takes within its part of the budget: labels are served in order of what they take, each
    at most an equal share of what is left (water-filling), so a label that takes little keeps
    its logits and leaves the rest to the others. ``shift``: lower by a shift (a layer with a
    bias), else by a scale in (0, 1]."""
    old = pool.targets < num_old
    n_old, n_new = int(old.sum()), int((~old).sum())
    k = pool.logits.shape[1] - num_old
    unchanged = Choice("none", 1.0, 0.0, None, None, n_old, n_new, limited=limited)
    if not n_old or not k:
        return unchanged
    best_old = pool.logits[:, :num_old].max(dim=1)
    right_if_old = best_old.indices == pool.targets
    new = pool.logits[:, num_old:]
    at_risk = old & right_if_old  # old images a new label can take
    taken = at_risk & (new.max(dim=1).values > best_old.values)
    interval = wilson(int(taken.sum()), n_old)
    if interval is None or interval[0] <= cfg.max_old_drop:
        return _scored(unchanged, num_old, pool)
    # critical[i, c]: label c takes pooled image i iff its shift (or scale) goes beyond it
    top = best_old.values[:, None]
    if shift:
        critical, rest = top - new, 0.0
    else:  # alpha * z > top; with z <= 0 the label takes it at any alpha in (0, 1] or none
        critical = torch.where(
            new > 0, top / new.clamp_min(1e-12), torch.where(new > top, -1.0, 2.0)
        )
        rest = 1.0
    risky = critical[at_risk]
    takes = (risky < rest).sum(dim=0)  # what each label takes on its own, as fitted
    budget, left = int(cfg.max_old_drop * n_old), k
    settings = [rest] * k
    for c in sorted(range(k), key=lambda c: int(takes[c])):
        share = budget // left if left else 0
        if int(takes[c]) <= share:
            budget, left = budget - int(takes[c]), left - 1
            continue
        # the least lowering that leaves it ``share`` old images: just below the next one it
        # would take, halfway to the nearest pooled image under that (the pool's resolution)
        nxt = float(torch.sort(risky[:, c]).values[share])
        under = critical[:, c][critical[:, c] < nxt]
        cut = (float(under.max()) + nxt) / 2 if len(under) else nxt - 1.0
        settings[c] = max(cut, 1e-3) if not shift else min(cut, 0.0)
        budget, left = budget - share, left - 1
    if shift:
        choice = Choice("brake", 1.0, tuple(settings), None, None, n_old, n_new, limited=limited)
    else:
        choice = Choice("brake", tuple(settings), 0.0, None, None, n_old, n_new, limited=limited)
    return _scored(choice, num_old, pool)


def _scored(choice: Choice, num_old: int, pool: Pool) -> Choice:
    """``choice`` with the pool's old- and new-class accuracy under it."""
    predicted = layer_logits(pool.logits, num_old, choice.alpha, choice.beta).argmax(dim=1)
    old = pool.targets < num_old
    right = predicted == pool.targets
    old_acc = right[old].float().mean().item() if bool(old.any()) else None
    new_acc = right[~old].float().mean().item() if bool((~old).any()) else None
    return replace(choice, old_accuracy=old_acc, new_accuracy=new_acc)


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
