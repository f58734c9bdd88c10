"""Real data for tests and benchmarks: scikit-learn's handwritten digits (8x8 scans).

A base classifier is trained here, from scratch, on some digits; Graft then teaches it the
others. Images are written as 32x32 PNGs and the base model is trained through the engine's
own preprocessing, so what Graft sees is exactly what the model was trained on.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from engine.architectures import build_model
from engine.data import eval_transform
from engine.preprocessing import Preprocessing

OLD = list(range(9))  # the base model knows 0-8; "9" is the label Graft teaches it
ARCH = "timm:resnet18"
SMALL_ARCH = "timm:resnet10t"  # 20 MB a file, against resnet18's 45
SIZE = 32
PREP = Preprocessing(input_size=(3, SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@dataclass
class Digits:
    images: list[Image.Image]
    targets: np.ndarray

    def of(self, digit: int) -> list[Image.Image]:
        return [im for im, t in zip(self.images, self.targets, strict=True) if t == digit]


def load(split_seed: int = 0) -> tuple[Digits, Digits]:
    """(base, held_out): half of every digit to train the base model, half for Graft."""
    raw = load_digits()
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(raw.target))
    images = [
        Image.fromarray((raw.images[i] * (255 / 16)).astype(np.uint8), "L").resize(
            (SIZE, SIZE), Image.Resampling.BILINEAR
        )
        for i in order
    ]
    targets = raw.target[order]
    half = len(order) // 2
    return Digits(images[:half], targets[:half]), Digits(images[half:], targets[half:])


def tensors(images: list[Image.Image]) -> torch.Tensor:
    transform = eval_transform(PREP)
    return torch.stack([transform(im.convert("RGB")) for im in images])


def train_base(
    digits: Digits,
    classes: list[int],
    architecture: str = "timm:resnet18",
    epochs: int = 6,
    seed: int = 0,
    model: nn.Module | None = None,
) -> nn.Module:
    """A classifier trained from scratch on ``classes``; output unit i is ``classes[i]``.
    ``model``: a freshly built one to train (else ``architecture`` is built)."""
    torch.manual_seed(seed)
    keep = np.isin(digits.targets, classes)
    x = tensors([im for im, k in zip(digits.images, keep, strict=True) if k])
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(t)] for t in digits.targets[keep]])
    model = (model or build_model(architecture, len(classes))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def write_image_folder(root: Path, folders: dict[str, list[Image.Image]]) -> Path:
    for label, images in folders.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(root / label / f"{i:04d}.png")
    return root


def zip_image_folder(folders: dict[str, list[Image.Image]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for label, images in folders.items():
            for i, im in enumerate(images):
                png = io.BytesIO()
                im.save(png, format="PNG")
                zf.writestr(f"{label}/{i:04d}.png", png.getvalue())
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """One image as a PNG file's bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def register_digits(
    client: Any,
    weights: Path,
    name: str = "digits",
    reference: str | None = None,
    headers: dict[str, str] | None = None,
    gate: str | None = None,
    architecture: str = ARCH,
) -> Any:
    """Register the digits 0-8 model through ``client`` (a TestClient or an httpx.Client);
    ``reference``: a dataset id for its reference set; ``gate``: its gate settings (JSON);
    ``architecture``: what ``weights`` are of."""
    data = {
        "name": name,
        "architecture": architecture,
        "labels": json.dumps([str(d) for d in OLD]),
        "preprocessing": json.dumps(PREP.to_dict()),
    }
    if reference:
        data["reference_dataset_id"] = reference
    if gate is not None:
        data["gate"] = gate
    with weights.open("rb") as f:
        return client.post(
            "/v1/models", data=data, files={"weights": ("digits.safetensors", f)}, headers=headers
        )


def digits_archive(held: Digits, old_per_class: int = 20, new_shots: int = 10) -> bytes:
    folders = {str(d): held.of(d)[:old_per_class] for d in OLD}
    folders["9"] = held.of(9)[:new_shots]
    return zip_image_folder(folders)
