"""Small photos as users send them, cut from the real photos that ship with scikit-learn, in the
formats and JPEG flavours a decoder meets: baseline and progressive colour, greyscale, CMYK,
and PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from engine.data import Sample

KINDS = ("baseline", "progressive", "grey", "cmyk", "png")


def write_photos(
    root: Path, n: int, size: tuple[int, int], kinds: tuple[str, ...] = KINDS
) -> list[Sample]:
    """``n`` photos of ``size`` (width, height), random crops of the two photos, their kind
    taken in turn from ``kinds``; every one under the label ``photo``."""
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        crop_w = int(rng.integers(width // 3, width))
        crop_h = min(height, round(crop_w * size[1] / size[0]))
        x0 = int(rng.integers(0, width - crop_w + 1))
        y0 = int(rng.integers(0, height - crop_h + 1))
        image = Image.fromarray(photo[y0 : y0 + crop_h, x0 : x0 + crop_w]).resize(size)
        kind = kinds[i % len(kinds)]
        path = root / f"{i:03d}-{kind}.{'png' if kind == 'png' else 'jpg'}"
        if kind == "grey":
            image = image.convert("L")
        elif kind == "cmyk":
            image = image.convert("CMYK")
        image.save(path, quality=90, progressive=kind == "progressive")
        samples.append(Sample(path, "photo"))
    return samples
