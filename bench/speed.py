"""Speed of a Graft job against the physical limit and against the seed-style loop.

For each architecture, at 224 px, over the same N images (digit scans, upscaled):

  graft       a whole Graft job in head mode with K views per image (extract once, refit the
              classifier layer on cached features, cross-fit it 5 times to measure it)
  inference   one plain inference pass over the same images x views, in the same memory format
              (channels_last): the least any method that looks at every view once can spend
  seed-style  the article's loop: 10 epochs, each running the frozen backbone over every image
              and training the head (Adam, lr 1e-3), as written (default memory format)

Prints seconds and the ratios graft/inference and seed-style/graft, measured in one run (graft
and inference interleaved, best of --repeat each, after a warm-up at full batch size).
`.venv/bin/python bench/speed.py [--images N] [--views K] [--arch timm:resnet18 ...]`

On a GPU (`--device cuda`), `--extraction` also prints the throughput of the engine's
extraction pass (loader workers decoding into pinned memory, the backbone under autocast to
the chosen dtype, float32 features back in host memory) against a pure forward of the same
backbone in the same dtype on a batch already on the GPU: the most the GPU itself can give.
More images than the digit scans hold (about 90 per digit) are made by shifting and rotating
them a little, each one distinct (a job counts an image once by its bytes), e.g.
`--images 10000 --views 1 --no-seed --extraction --device cuda --workers 8`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_profile import make_photos  # noqa: E402
from devkit import digits as D  # noqa: E402
from engine.architectures import build_model  # noqa: E402
from engine.data import (  # noqa: E402
    Augmentation,
    ImageDataset,
    Sample,
    eval_transform,
    scan_image_folder,
)
from engine.decoded import DecodedCache  # noqa: E402
from engine.device import PRECISIONS, compute_dtype, precision_name  # noqa: E402
from engine.device_decode import (  # noqa: E402
    DECODE_CHOICES,
    DeviceBatches,
    plan,
)
from engine.expand import ExpansionConfig, ExpansionRequest, expand_classifier  # noqa: E402
from engine.features import autocast_for, extract_features, pick_device  # noqa: E402
from engine.heads import expand_head, find_head  # noqa: E402
from engine.preprocessing import Preprocessing

PREP = Preprocessing(input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
OLD = [str(d) for d in range(9)]


def images(root: Path, n: int) -> list:
    _, held = D.load()
    per_label = max(1, n // 10)
    folders = {
        str(d): [im.resize((64, 64)) for im in _enough(held.of(d), per_label)] for d in range(10)
    }
    return scan_image_folder(D.write_image_folder(root, folders))


def _enough(scans: list, n: int) -> list:
    """``n`` images of a digit: its scans, then (only if more are wanted than there are) the
    scans shifted and rotated a little, each variant marked in a corner pixel so that no two
    files are the same bytes."""
    out = list(scans[:n])
    rng = np.random.default_rng(0)
    k = 0
    while len(out) < n:
        im = scans[k % len(scans)].rotate(
            float(rng.uniform(-8, 8)), translate=tuple(int(v) for v in rng.integers(-2, 3, 2))
        )
        im.putpixel((0, 0), (k // len(scans)) % 256)
        im.putpixel((1, 0), (k // len(scans)) // 256)
        out.append(im)
        k += 1
    return out


def extracted_by_graft(samples: list, views: int) -> list:
    """Exactly what a job runs the backbone on: every image `views` times (with a frozen
    backbone every image trains, and is measured by cross-fitting)."""
    return samples * views


def graft_job(
    arch: str,
    weights: Path,
    samples: list,
    views: int,
    device: str,
    workers: int = 2,
    precision: str = "auto",
    decoded: DecodedCache | None = None,
    decode: str = "auto",
) -> tuple[float, dict]:
    """Seconds, and where the job decoded its images (its metrics' ``decoding``)."""
    aug = Augmentation(views=views, rotation_degrees=5, scale=(0.9, 1.1))
    config = ExpansionConfig(
        augmentation=aug,
        device=device,
        num_workers=workers,
        precision=precision,
        decoded=decoded,
        decode=decode,
    )
    request = ExpansionRequest(arch, OLD, weights, PREP, samples, ["9"], config)
    started = time.perf_counter()
    result = expand_classifier(request)
    return time.perf_counter() - started, result.metrics["decoding"]


@torch.inference_mode()
def inference_pass(
    model: torch.nn.Module,
    samples: list,
    views: int,
    device: str,
    workers: int = 2,
    dtype: torch.dtype | None = None,
) -> float:
    dev = torch.device(device)
    loader = DataLoader(
        ImageDataset(samples, PREP, eval_transform(PREP), views),
        batch_size=64,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    model.to(dev, memory_format=torch.channels_last).eval()  # as fast as the engine's pass
    started = time.perf_counter()
    for batch, _ in loader:
        with autocast_for(dev, dtype):
            model(batch.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    model.to(memory_format=torch.contiguous_format)
    return elapsed


def extraction(
    model: torch.nn.Module,
    samples: list,
    device: str,
    dtype: torch.dtype,
    workers: int,
    batch_size: int = 64,
    decode: str = "auto",
) -> tuple[float, float]:
    """Images per second: the engine's extraction pass over ``samples`` (its images decoded
    where ``decode`` puts them, as in a job), and a pure forward of the same backbone in the
    same dtype over as many images, on a batch already on the device (same memory format; no
    decoding, no copies)."""
    dev = torch.device(device)
    head = find_head(model)
    decoding = plan(decode, dev, PREP)
    loader: DataLoader | DeviceBatches
    if decoding.on_device:  # as a job would
        loader = DeviceBatches(
            samples, PREP, dev, batch_size, workers, None, decoding.jpeg_on_device
        )
    else:
        loader = DataLoader(
            ImageDataset(samples, PREP, eval_transform(PREP)),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=dev.type == "cuda",
        )
    started = time.perf_counter()
    feats, _ = extract_features(model, head, loader, dev, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ours = len(feats) / (time.perf_counter() - started)

    x = torch.randn(batch_size, *PREP.input_size, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    model.to(dev, memory_format=torch.channels_last).eval()
    steps = math.ceil(len(samples) / batch_size)
    with torch.inference_mode(), autocast_for(dev, dtype):
        for _ in range(3):  # warm-up (cuDNN picks its algorithms)
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    pure = steps * batch_size / (time.perf_counter() - started)
    model.to(memory_format=torch.contiguous_format)
    return ours, pure


def seed_style(
    arch: str, model: torch.nn.Module, samples: list, device: str, workers: int = 2
) -> float:
    dev = torch.device(device)
    head = expand_head(model, find_head(model), 1)
    model.requires_grad_(False).to(dev).eval()
    head.module.requires_grad_(True)
    labels = OLD + ["9"]
    targets = torch.tensor([labels.index(s.label) for s in samples])
    loader = DataLoader(
        ImageDataset(samples, PREP, eval_transform(PREP)),
        batch_size=32,
        shuffle=True,
        num_workers=workers,
    )
    optimizer = torch.optim.Adam(head.module.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(10):
        for batch, index in loader:
            loss = F.cross_entropy(model(batch.to(dev)), targets[index].to(dev))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument(
        "--arch", nargs="+", default=["timm:resnet18", "timm:mobilenetv3_large_100"]
    )
    parser.add_argument("--device", default=str(pick_device()))
    parser.add_argument("--repeat", type=int, default=2, help="runs of graft and inference")
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="GRAFT_PRECISION (on a CPU: bf16 where its matrix units take it, else fp32)",
    )
    parser.add_argument("--no-seed", action="store_true", help="skip the seed-style loop")
    parser.add_argument(
        "--extraction", action="store_true", help="also: extraction pass against a pure forward"
    )
    parser.add_argument(
        "--second-job",
        action="store_true",
        help="also: a second job on the same images, reading the pixels the first decoded",
    )
    parser.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default="auto",
        help="where the job decodes its images (GRAFT_DECODE)",
    )
    parser.add_argument(
        "--photos",
        action="store_true",
        help="500x375 JPEG photos (bench/decode_profile.py's) instead of digit scans",
    )
    args = parser.parse_args()
    dtype = compute_dtype(torch.device(args.device), args.precision)
    print(
        f"{args.images} images at 224 px, {args.views} views per training image, "
        f"device {args.device}, torch {torch.__version__}"
        + (f", {_gpu()}" if args.device != "cpu" else "")
        + f", backbone in {precision_name(dtype)} (the seed-style loop in fp32, as written)"
    )
    print(
        f"{'architecture':<28} {'graft s':>8} {'infer s':>8} {'seed s':>8} "
        f"{'graft/infer':>11} {'seed/graft':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.photos:
            made = make_photos(
                Path(tmp) / "photos", args.images, 0, (500, 375), os.cpu_count() or 1
            )
            labels = OLD + ["9"]
            samples = [Sample(s.path, labels[i % 10]) for i, s in enumerate(made["jpeg"])]
        else:
            samples = images(Path(tmp) / "images", args.images)
        for arch in args.arch:
            torch.manual_seed(0)
            model = build_model(arch, len(OLD))
            weights = Path(tmp) / "weights.safetensors"
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()}, str(weights)
            )
            workers, device, precision = args.workers, args.device, args.precision
            decode = args.decode
            inference_pass(model, samples[:64], 1, device, workers, dtype)  # warm-up, full batch
            extracted = extracted_by_graft(samples, args.views)
            graft_s, infer_s = float("inf"), float("inf")
            for _ in range(args.repeat):  # interleaved; the best of each
                job_s, decoding = graft_job(
                    arch, weights, samples, args.views, device, workers, precision, None, decode
                )
                graft_s = min(graft_s, job_s)
                infer_s = min(infer_s, inference_pass(model, extracted, 1, device, workers, dtype))
            if args.no_seed:
                seed, ratio = f"{'-':>8}", f"{'-':>10}"
            else:
                seed_s = seed_style(arch, model, samples, device, workers)
                seed, ratio = f"{seed_s:>8.2f}", f"{seed_s / graft_s:>10.1f}"
            print(
                f"{arch:<28} {graft_s:>8.2f} {infer_s:>8.2f} {seed} "
                f"{graft_s / infer_s:>11.2f} {ratio}",
                flush=True,
            )
            print(f"  the job decoded its images: {_where(decoding)}", flush=True)
            second_s = None
            if args.second_job:
                decoded = DecodedCache(Path(tmp) / "decoded", arch.replace(":", "-"), 1 << 40)
                job = (arch, weights, samples, args.views, device, workers, precision, decoded)
                graft_job(*job, decode)
                second_s, decoding = graft_job(*job, decode)
                print(
                    f"  a second job on the same images, their pixels kept by the first: "
                    f"{second_s:.2f} s ({second_s / graft_s:.2f} of the first job, "
                    f"{second_s / infer_s:.2f} of one inference pass; {_where(decoding)})",
                    flush=True,
                )
            if args.extraction:
                torch.manual_seed(0)
                backbone = build_model(arch, len(OLD))
                ours, pure = extraction(backbone, samples, device, dtype, workers, decode=decode)
                print(
                    f"  extraction of {len(samples)} images: graft {ours:.0f} images/s, "
                    f"pure {precision_name(dtype)} forward {pure:.0f} images/s "
                    f"({ours / pure:.2f} of it)",
                    flush=True,
                )
                if second_s is not None:
                    forward_s = len(samples) / pure
                    print(
                        f"  the second job took {second_s / forward_s:.2f} times a pure forward "
                        f"over its {len(samples)} images ({forward_s:.2f} s)",
                        flush=True,
                    )


def _where(decoding: dict) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in decoding.get("images", {}).items())
    return f"{decoding['where']} ({decoding['decoder']}{': ' + counts if counts else ''})"


def _gpu() -> str:
    if not torch.cuda.is_available():
        return "no GPU"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (capability {major}.{minor})"


if __name__ == "__main__":
    main()
