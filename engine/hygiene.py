"""What is wrong with the labels themselves, found before anyone trusts the figures.

* **Likely mislabeled images**: confident learning (Northcutt et al. 2021, ``cleanlab``) over
  the out-of-fold probabilities cross-fitting already computes. An image is listed when the
  layers that never saw it confidently put it in another label, beyond what that pair of labels
  is confused at; each carries the label it looks like and how sure the layers were.
* **Near-duplicates** (``lineage.near_duplicates``) are kept in one fold by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

SHOWN = 50  # likely mislabeled images listed by name; the count covers all of them


def likely_mislabeled(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: list[str],
    describe: Callable[[int], dict],
) -> dict:
    """``{"checked", "count", "images": [...]}``: the images whose out-of-fold ``logits``
    confidently disagree with their ``targets``, worst first; ``describe(i)`` names image
    ``i`` (its digest, where it came from). Empty when fewer than two labels, or fewer than
    five images of some label, were scored: confident learning needs each label's typical
    confidence."""
    present = targets.unique()
    counts = torch.bincount(targets)
    empty = {"checked": len(targets), "count": 0, "images": []}
    if len(present) < 2 or int(counts[present].min()) < 5:
        return empty
    column = torch.full((len(labels),), -1, dtype=torch.long)
    column[present] = torch.arange(len(present))
    probs = torch.softmax(logits[:, present].double(), dim=1)
    given = column[targets]
    try:
        from cleanlab.filter import find_label_issues  # imports pandas: only when needed

        ranked = find_label_issues(
            given.numpy(),
            probs.numpy(),
            return_indices_ranked_by="self_confidence",
            n_jobs=1,
        )
    except Exception:  # noqa: BLE001 - a check, never a reason to fail the job
        log.warning("confident learning failed; no label issues listed", exc_info=True)
        return empty
    images = []
    for i in ranked[:SHOWN].tolist():
        suggested = int(present[int(probs[i].argmax())])
        images.append(
            describe(i)
            | {
                "label": labels[int(targets[i])],
                "looks_like": labels[suggested],
                "confidence": round(float(probs[i].max()), 4),
                "label_confidence": round(float(probs[i, int(given[i])]), 4),
            }
        )
    return {"checked": len(targets), "count": len(ranked), "images": images}
