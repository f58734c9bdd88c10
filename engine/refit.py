"""Refit the whole classifier layer as one convex problem, anchored to what it knew.

With real images of old labels (uploaded, or from the reference set) the layer can be refitted
as a whole rather than only grown: a class-balanced softmax regression over every row, where

* the old rows are pulled towards the original layer's (a ridge around it, not around zero),
  so a handful of reference images moves them only where they disagree with it;
* the new rows are pulled towards zero;
* the old logits of every image are kept near the original layer's (distillation), so the
  refit keeps the original's view of every image it sees;
* both ridges are measured in the features' own geometry: standardised, then whitened by the
  shrunk within-class covariance (through its Cholesky factor), so no feature dimension
  dominates by its scale;
* every image weighs the same, however many augmented views it has: a view weighs one over its
  image's views, and the ridges are scaled per image.

It is solved by full-batch L-BFGS, deterministically; the data term's gradient is summed over
chunks of rows, so memory-mapped features are never loaded whole. The result folds back into a
plain linear layer on the raw features. On a GPU the solve runs there: the features go to it
once when they fit in a quarter of its free memory, else chunk by chunk on every pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.device import one_thread
from engine.errors import JobCancelled

CHUNK = 8192  # rows per step of a pass over the features (they may be memory-mapped)
SLOW_ON_CPU_S = 180  # a job whose refits took longer on the CPU says a GPU worker would help


@dataclass(frozen=True)
class Solve:
    """One refit as solved: its size, L-BFGS's iterations and loss evaluations, the largest
    gradient component where it stopped (in the whitened space; L-BFGS stops below 1e-6, when
    the loss stops changing, or at ``Refit.max_iter``), the time."""

    rows: int
    features: int
    classes: int
    iterations: int
    evaluations: int
    gradient_max: float
    seconds: float
    device: str


def solver_report(solves: list[Solve]) -> dict:
    """What a job's refits cost and how far they converged: every fold's refit, then the
    layer's on every image (``final``)."""
    return {
        "count": len(solves),
        "device": solves[-1].device,
        "seconds": round(sum(s.seconds for s in solves), 3),
        "iterations_max": max(s.iterations for s in solves),
        "gradient_max": max(s.gradient_max for s in solves),
        "final": asdict(solves[-1]),
    }


def slow_on_cpu(report: dict) -> str | None:
    """A warning when a job's refits were slow on the CPU, else None."""
    if report["device"] != "cpu" or report["seconds"] <= SLOW_ON_CPU_S:
        return None
    final = report["final"]
    return (
        f"fitting the layer took {report['seconds'] / 60:.0f} minutes on the CPU "
        f"({report['count']} refits of up to {final['rows']:,} rows x {final['features']:,} "
        f"features x {final['classes']:,} labels): a GPU worker solves them in seconds "
        "(a worker on a machine with a GPU uses it)"
    )


@dataclass(frozen=True)
class Refit:
    old_anchor: float = 0.03  # ridge of old rows around the original, per 200 images
    new_ridge: float = 0.03  # ridge of new rows around zero, per 200 images
    metric_shrink: float = 0.2  # within-class covariance shrunk this far towards the identity
    distillation: float = 0.01  # squared distance of old logits to the original's
    max_iter: int = 200


def _to_device(
    features: torch.Tensor, index: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows used, on ``device`` when they fit in a quarter of its free memory; else left
    where they are (each pass then moves them chunk by chunk)."""
    if device.type != "cuda":
        return features, index
    rows = len(features) if index is None else len(index)
    if rows * features.shape[1] * 4 > torch.cuda.mem_get_info(device)[0] // 4:
        return features, index
    used = features if index is None else features[index]
    return used.to(device, dtype=torch.float32), None


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _rows(
    features: torch.Tensor, index: torch.Tensor | None, part: slice, device: torch.device
) -> torch.Tensor:
    rows = features[part] if index is None else features[index[part].cpu()]
    return rows.to(device, dtype=torch.float32, non_blocking=True)


def _geometry(
    features: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor | None,
    num_classes: int,
    shrink: float,
    center: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, std, L)``: standardisation, and the Cholesky factor of the shrunk within-class
    covariance of the standardised features (``L`` empty when shrunk all the way to the
    identity)."""
    n, dim, device = len(targets), features.shape[1], targets.device
    f64 = {"dtype": torch.float64, "device": device}
    total = torch.zeros(dim, **f64)
    squares = torch.zeros(dim, **f64)
    by_class = torch.zeros(num_classes, dim, **f64)
    for part in _chunks(n):
        x = _rows(features, index, part, device).double()
        total += x.sum(0)
        squares += (x * x).sum(0)
        by_class.index_add_(0, targets[part], x)
    mean = total / n if center else torch.zeros(dim, **f64)
    var = (squares / n - 2 * mean * total / n + mean * mean).clamp_min(0)
    std = var.sqrt()
    std = std.clamp_min(1e-6 * float(std.mean()) + 1e-12)
    if shrink >= 1:  # the identity: standardised features, no rotation
        return mean.float(), std.float(), torch.eye(0, device=device)
    counts = torch.bincount(targets, minlength=num_classes).double().clamp_min(1)
    class_mean = (by_class / counts[:, None] - mean) / std
    scatter = torch.zeros(dim, dim, **f64)
    for part in _chunks(n):
        z = (_rows(features, index, part, device).double() - mean) / std
        z -= class_mean[targets[part]]
        scatter += z.T @ z
    scatter /= n
    scatter /= scatter.diagonal().mean() + 1e-12
    scatter = (1 - shrink) * scatter + shrink * torch.eye(dim, **f64)
    return mean.float(), std.float(), whitening_factor(scatter.float())  # shrunk: well conditioned


def whitening_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``L``, lower-triangular, with ``L @ L.T == matrix`` (Cholesky). Whitening by ``L``'s
    inverse is whitening by the eigendecomposition up to a rotation, which neither the ridges
    (Frobenius norms) nor L-BFGS can tell apart, at a quarter of the cost: on one thread 0.05
    against 0.20 s for 1,280 features (mobilenetv3's), 0.26 against 0.87 s for 2,048. On a
    CPU in one thread: threaded LAPACK spins when the cores are busy (an API beside the
    worker, other jobs): measured on a loaded 2-core machine, an eigendecomposition of
    512 x 512 took 2.4 s on two threads and 0.033 s on one."""
    if matrix.device.type != "cpu":
        return torch.linalg.cholesky(matrix)
    with one_thread():
        return torch.linalg.cholesky(matrix)


def refit_layer(
    features: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_old: int,
    cfg: Refit,
    index: torch.Tensor | None = None,
    old_rows_frozen: bool = False,
    train_bias: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str | None = None,
    row_weight: torch.Tensor | None = None,
    on_solved: Callable[[Solve], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer refitted on ``features[index]`` (every row when None) labelled ``targets``;
    ``weight``/``bias`` hold the original old rows and a starting point for the new ones.
    With ``old_rows_frozen`` the old rows come back bit-identical; without ``train_bias`` the
    bias stays as given (and the features are not centred, which a bias would absorb).
    ``device``: where to solve (default the CPU); the layer comes back on the CPU.
    ``row_weight``: each row's share of its image (one over its views; default 1).
    ``on_solved``: told how the solve went (a :class:`Solve`)."""
    started = time.perf_counter()
    device = torch.device("cpu" if device is None else device)
    features, index = _to_device(features, index, device)
    targets, weight, bias = targets.to(device), weight.to(device), bias.to(device)
    index = None if index is None else index.to(device)
    n, num_classes = len(targets), weight.shape[0]
    share = (
        torch.ones(n, device=device)
        if row_weight is None
        else row_weight.to(device, dtype=torch.float32)
    )
    images = float(share.sum())
    mean, std, factor = _geometry(
        features, targets, index, num_classes, cfg.metric_shrink, center=train_bias
    )
    rotate = factor.numel() > 0
    if rotate:  # q-space rows are standardised rows times L; back through L's inverse, once
        eye = torch.eye(len(factor), device=device)
        inverse = torch.linalg.solve_triangular(factor, eye, upper=False)

    def from_q(wq: torch.Tensor, bq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wx = (wq @ inverse if rotate else wq) / std
        return wx, bq - wx @ mean

    w0, b0 = weight.float(), bias.float()
    start_q = (w0 * std) @ factor if rotate else w0 * std  # the rows in q-space
    start_b = b0 + w0 @ mean
    anchor = start_q[:num_old].clone()
    counts = torch.bincount(targets, weights=share, minlength=num_classes).float()
    present = counts > 0
    class_weight = torch.zeros(num_classes, device=device)
    class_weight[present] = counts.sum() / (present.sum() * counts[present])
    scale = 200.0 / max(images, 1.0)
    old_ridge, new_ridge = cfg.old_anchor * scale, cfg.new_ridge * scale
    moving_from = num_old if old_rows_frozen else 0
    wq = start_q[moving_from:].clone().requires_grad_(True)
    bq = start_b[moving_from:].clone().requires_grad_(train_bias)
    params = [wq, bq] if train_bias else [wq]
    teacher_w, teacher_b = w0[:num_old], b0[:num_old]

    def layer() -> tuple[torch.Tensor, torch.Tensor]:
        full_w = torch.cat([start_q[:moving_from], wq])
        full_b = torch.cat([start_b[:moving_from], bq])
        return full_w, full_b

    optimizer = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=cfg.max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        if should_stop():
            raise JobCancelled()
        optimizer.zero_grad()
        full_w, full_b = layer()
        wx, bx = from_q(full_w, full_b)
        grad_w, grad_b, data = torch.zeros_like(wx), torch.zeros_like(bx), 0.0
        with torch.no_grad():
            for part in _chunks(n):
                x, y = _rows(features, index, part, device), targets[part]
                logits = x @ wx.T + bx
                p = F.softmax(logits, dim=1)
                w = class_weight[y] * share[part]
                data += float((F.cross_entropy(logits, y, reduction="none") * w).sum())
                g = p * w[:, None]
                g[torch.arange(len(y), device=device), y] -= w
                if num_old and cfg.distillation and not old_rows_frozen:
                    gap = (logits[:, :num_old] - (x @ teacher_w.T + teacher_b)) * share[part, None]
                    data += 0.5 * cfg.distillation * float((gap * gap / share[part, None]).sum())
                    g[:, :num_old] += cfg.distillation * gap
                grad_w += g.T @ x
                grad_b += g.sum(0)
        torch.autograd.backward([wx, bx], [grad_w / images, grad_b / images])
        penalty = 0.5 * new_ridge * (full_w[num_old:] ** 2).sum()
        if not old_rows_frozen:
            penalty = penalty + 0.5 * old_ridge * ((full_w[:num_old] - anchor) ** 2).sum()
        penalty.backward()
        return torch.tensor(data / images) + penalty.detach()

    optimizer.step(closure)
    if on_solved is not None:
        seconds = time.perf_counter() - started
        closure()  # the gradient where it stopped (one pass more)
        state = optimizer.state[params[0]]
        on_solved(
            Solve(
                rows=n,
                features=weight.shape[1],
                classes=num_classes,
                iterations=int(state.get("n_iter", 0)),
                evaluations=int(state.get("func_evals", 0)),
                gradient_max=float(f"{float(max(p.grad.abs().max() for p in params)):.3g}"),
                seconds=round(seconds, 3),
                device=device.type,
            )
        )
    with torch.no_grad():
        full_w, full_b = layer()
        wx, bx = from_q(full_w, full_b)
        if old_rows_frozen:  # bit-identical, not merely equal after a round trip
            wx[:num_old], bx[:num_old] = weight[:num_old], bias[:num_old]
        if not train_bias:
            bx = bias.clone()
    return wx.detach().cpu(), bx.detach().cpu()
