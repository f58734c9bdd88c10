"""Run a model once before Graft accepts it, and refuse what would fail later.

A model that registers must run on a batch of images of its input size, give one finite logit
per label for each image, give the same logits for the same image whatever batch it is in and
however often it is run (no layer left random at inference: dropout, augmentation, batch
statistics), and its logits must be exactly what its classifier layer writes (not an average
of two heads, not a transform of the layer's output): that is the layer Graft grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UnsupportedHead, WeightsError, named
from engine.heads import find_head
from engine.preprocessing import Preprocessing

AGREE = 1e-4  # of the largest logit: two runs of one image, and the layer against the logits


@dataclass(frozen=True)
class ModelSummary:
    """What a checked model is, as its registration reports it."""

    family: str
    parameters: int
    outputs: int
    head: str  # the classifier layer's path
    input_size: tuple[int, int, int]
    batch: int | None  # the only batch size the model takes, None for any


def probe_images(prep: Preprocessing, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` deterministic, smooth test images in the model's input form (normalised)."""
    channels, height, width = prep.input_size
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 8, 8, generator=generator)
    pixels = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
    std = torch.tensor(prep.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def probe(model: nn.Module, prep: Preprocessing, num_labels: int) -> ModelSummary:
    """Run ``model`` on 2 and on 3 test images; :class:`WeightsError` (or
    :class:`UnsupportedHead`) saying what is wrong, else what the model is."""
    head = find_head(model)
    images = probe_images(prep, 3)
    written: list[torch.Tensor] = []
    hook = head.module.register_forward_hook(lambda m, i, out: written.append(out.detach()))
    try:
        with torch.inference_mode():
            pair = _run(model, images[:2], prep)
            triple = _run(model, images, prep)
    finally:
        hook.remove()
    if tuple(pair.shape) != (2, num_labels):
        raise WeightsError(
            f"the model gives outputs of shape {tuple(pair.shape)} for 2 images; expected "
            f"(2, {num_labels}): one logit per label"
        )
    if not torch.isfinite(pair).all():
        raise WeightsError("the model gives NaN or infinite logits on test images")
    scale = max(1.0, pair.abs().max().item())
    drift = (pair - triple[:2]).abs().max().item() / scale
    if drift > AGREE:
        raise WeightsError(
            f"the model's logits for the same images change from run to run (by {drift:.2g} of "
            "the largest): a layer stays random at inference (dropout, augmentation) or mixes "
            "the images of a batch; save the model for inference"
        )
    if written and tuple(written[0].shape) == tuple(pair.shape):
        apart = (written[0].float() - pair.float()).abs().max().item() / scale
        if apart > AGREE:
            raise UnsupportedHead(
                f"the model's logits are not what its classifier layer {head.path!r} writes "
                f"(they differ by {apart:.2g} of the largest): it averages several heads "
                "(distillation) or transforms the layer's output. Graft grows models whose "
                "logits come straight from one linear layer"
            )
    return ModelSummary(
        family=getattr(model, "graft_family", None) or "torch",
        parameters=sum(t.numel() for t in model.state_dict().values()),
        outputs=num_labels,
        head=head.path,
        input_size=prep.input_size,
        batch=getattr(model, "batch", None),
    )


def _run(model: nn.Module, images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    try:
        out = model(images)
    except Exception as exc:  # noqa: BLE001 (whatever a foreign model raises)
        if isinstance(exc, MemoryError):
            raise
        raise WeightsError(
            f"the model does not run on a batch of {len(images)} images of "
            f"{'x'.join(map(str, prep.input_size))}: {named(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise WeightsError(f"the model returns a {type(out).__name__}, not a tensor of logits")
    return out.float()
