"""Make a model and a dataset to try Graft with, from scikit-learn's handwritten digits.

    .venv/bin/python examples/make_digits.py var/example

trains a resnet10t on the CPU (about 16 s on 2 idle cores; one line per
epoch goes to stderr) and writes:
  digits-0-8.safetensors   a resnet10t trained from scratch on the digits 0-8
  labels.json              its labels, one per output unit
  preprocessing.json       how its inputs were prepared (32x32 RGB, mean/std 0.5)
  digits.zip               an ImageFolder archive: 60 images of each known digit, 15 of "9"
  reference.zip            20 other images of each known digit: a reference set for the model
  nines.zip                the 15 images of "9" alone: what a user with only new images has
  test.zip                 20 images of each digit 0-9 that digits.zip does not hold: a test set
                           to compare versions on (the known digits are reference.zip's)
  nine.png, three.png      two single images to ask a model about

``--epochs`` trains for fewer passes (default 10): faster, and a less accurate model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from devkit import digits as D  # noqa: E402
from engine.architectures import build_model  # noqa: E402

BATCH = 64
ARCH = "timm:resnet10t"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(base: D.Digits, classes: list[int], epochs: int, seed: int = 0) -> nn.Module:
    """A resnet10t trained from scratch on ``classes``, one progress line per epoch on stderr
    (and a bar while it runs, on a terminal)."""
    torch.manual_seed(seed)
    keep = np.isin(base.targets, classes)
    x = D.tensors([im for im, k in zip(base.images, keep, strict=True) if k])
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(t)] for t in base.targets[keep]])
    model = build_model(ARCH, len(classes)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batches = (len(y) + BATCH - 1) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=2e-3, total_steps=epochs * batches
    )
    bar = progress_bar(epochs * batches)
    started = time.monotonic()
    first = 0.0  # the first epoch is slower than the others: leave it out of the estimate
    for epoch in range(1, epochs + 1):
        losses = []
        for idx in torch.randperm(len(y)).split(BATCH):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
        elapsed = time.monotonic() - started
        first = first or elapsed
        per_epoch = (elapsed - first) / (epoch - 1) if epoch > 1 else first
        left = per_epoch * (epochs - epoch)
        line = (
            f"epoch {epoch}/{epochs}: loss {sum(losses) / len(losses):.3f}, "
            f"{elapsed:.0f} s so far, about {left:.0f} s left"
        )
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            log(line)
    if bar is not None:
        bar.close()
    return model.eval()


def progress_bar(total: int):  # noqa: ANN201 - a tqdm bar, or None without tqdm or a terminal
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="batch", file=sys.stderr, leave=False)


def main(out: Path, epochs: int = 10) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base, held = D.load()
    passes = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    log(f"training a resnet10t on the digits 0-8 ({passes}, on the CPU) ...")
    model = train(base, list(range(9)), epochs)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "digits-0-8.safetensors"),
    )
    (out / "labels.json").write_text(json.dumps([str(d) for d in range(9)]))
    (out / "preprocessing.json").write_text(json.dumps(D.PREP.to_dict()))
    folders = {str(d): held.of(d)[:60] for d in range(9)} | {"9": held.of(9)[:15]}
    (out / "digits.zip").write_bytes(D.zip_image_folder(folders))
    reference = {str(d): held.of(d)[60:80] for d in range(9)}
    (out / "reference.zip").write_bytes(D.zip_image_folder(reference))
    (out / "nines.zip").write_bytes(D.zip_image_folder({"9": held.of(9)[:15]}))
    test = reference | {"9": held.of(9)[15:35]}
    (out / "test.zip").write_bytes(D.zip_image_folder(test))
    # Two images no archive holds, to ask a model about.
    (out / "nine.png").write_bytes(D.png_bytes(held.of(9)[-1]))
    (out / "three.png").write_bytes(D.png_bytes(held.of(3)[-1]))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="var/example", type=Path)
    parser.add_argument("--epochs", type=int, default=10, help="training passes (default 10)")
    args = parser.parse_args()
    main(args.out, args.epochs)
