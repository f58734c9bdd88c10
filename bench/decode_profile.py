"""Where the time of the engine's feature-extraction pass goes, on photos as users send them.

The data: N distinct JPEG "photos" (default 10,000 at 500x375, quality 90) cut from the two
real photos that ship with scikit-learn (`load_sample_images()`, 640x427): random crops at
random scales, flips and a small colour jitter, made on a process pool into a temp folder; and
the first --png-images of the same pixels as PNG files. Then, per format:

  CPU stages    one process, one thread (as a loader worker runs), ms per image over --sample
                images: file read; PIL decode at full size; PIL decode with `draft` (libjpeg
                DCT scaling, as engine/data.py's `open_image` asks for); torchvision's
                CPU decoder; the engine's `open_image`; then its `eval_transform` step by step
                (to uint8 tensor, antialiased resize to 224, to float + normalise); and one
                whole loader item (`ImageDataset.__getitem__`)
  cpu-loader    images/s of the engine's loader alone: DataLoader over `ImageDataset` with
                `eval_transform`, --workers processes, pinned memory on a GPU; no model
  extraction    images/s of the engine's extraction pass (`extract_features`: that loader, the
                copy to the device, the backbone under autocast, float32 features to the host)
  gpu-decode    images/s of `torchvision.io.decode_jpeg(list, device="cuda")` (nvjpeg) on
                batches of file bytes already in memory
  gpu-prep      images/s from files to a normalised batch on the GPU through the engine's
                device path (engine/device_decode.py, `DeviceBatches`): files read on a
                thread pool two batches ahead, decoded by nvjpeg, resized there (antialiased)
                and normalised, on a side thread and CUDA stream one batch ahead
  gpu+fwd       gpu-prep feeding the same `extract_features` (as a job with GRAFT_DECODE=auto)
  pure-fwd      the backbone alone, in the same dtype, on a batch already on the GPU: the most
                the GPU gives (as bench/speed.py --extraction measures it)

and extr/fwd, gpu/fwd: extraction and gpu+fwd as fractions of pure-fwd. PNG has no GPU
decoder (nvjpeg is JPEG only): its gpu columns decode and resize on --threads CPU threads as
the loaders do (PIL), copy the uint8 pixels and normalise on the GPU: the engine's path for
every file nvjpeg does not take. Once per run, on a GPU: the host-to-device copy of a pinned
uint8 batch against a float32 one (GB/s).

Every throughput runs over --timed images or --max-seconds, whichever ends first, after a
warm-up, with `torch.cuda.synchronize()` around its timer; loaders are timed from their start
(their workers' start-up included, as a job pays it). Backbones are built with random weights
(the speed does not depend on them), eval mode, channels_last, autocast to Graft's precision.
With --budget, measurements that would start after that many seconds are skipped ("-").

On a GPU (bench/gpu.sh runs it so):
`python bench/decode_profile.py --device cuda --images 10000 --workers 8`
A dry run on a CPU (the CUDA-only parts skipped, the gpu columns on the CPU, to check the code):
`.venv/bin/python bench/decode_profile.py --device cpu --images 64 --arch timm:resnet18`
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.architectures import build_model  # noqa: E402
from engine.data import ImageDataset, Sample, eval_transform, open_image  # noqa: E402
from engine.device import (  # noqa: E402
    PRECISIONS,
    compute_dtype,
    one_thread,
    precision_name,
)
from engine.device_decode import DeviceBatches  # noqa: E402
from engine.errors import JobCancelled  # noqa: E402
from engine.features import autocast_for, extract_features, pick_device  # noqa: E402
from engine.heads import find_head  # noqa: E402
from engine.preprocessing import Preprocessing  # noqa: E402

PREP = Preprocessing(input_size=(3, 224, 224))  # ImageNet mean and std, bilinear
SUFFIX = {"jpeg": ".jpg", "png": ".png"}
COLUMNS = (
    "cpu-loader",
    "extraction",
    "gpu-decode",
    "gpu-prep",
    "gpu+fwd",
    "pure-fwd",
    "extr/fwd",
    "gpu/fwd",
)

# --- the photos ---------------------------------------------------------------------------

_PHOTOS: list[np.ndarray] = []


def _load_photos() -> None:
    from sklearn.datasets import load_sample_images  # noqa: PLC0415 (only the makers need it)

    _PHOTOS[:] = load_sample_images().images


def _make_photo(job: tuple[int, str, tuple[int, int], bool]) -> tuple[int, int]:
    """Image ``i``: a random crop of one of the photos (half to all of the largest crop of the
    target's aspect), resized to ``size``, maybe flipped, its contrast, brightness and colour
    balance moved a little; seeded by ``i``. Returns the JPEG's and the PNG's sizes in bytes."""
    i, root, size, png = job
    rng = np.random.default_rng(i)
    photo = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    crop_w = max(16, round(min(width, height * aspect) * rng.uniform(0.5, 1.0)))
    crop_h = max(16, round(crop_w / aspect))
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    image = Image.fromarray(photo[y0 : y0 + crop_h, x0 : x0 + crop_w])
    image = image.resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.9, 1.1) + mean  # contrast
    pixels *= rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3)  # brightness, colour balance
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    jpeg = Path(root) / "jpeg" / f"{i:05d}.jpg"
    image.save(jpeg, quality=90)
    if not png:
        return jpeg.stat().st_size, 0
    png_path = Path(root) / "png" / f"{i:05d}.png"
    image.save(png_path)
    return jpeg.stat().st_size, png_path.stat().st_size


def make_photos(
    root: Path, n: int, n_png: int, size: tuple[int, int], processes: int
) -> dict[str, list[Sample]]:
    """``{"jpeg": [...], "png": [...]}``: the samples written; prints what was made."""
    for fmt in SUFFIX:
        (root / fmt).mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(root), size, i < n_png) for i in range(n)]
    methods = mp.get_all_start_methods()
    context = mp.get_context("fork" if "fork" in methods else None)  # before any CUDA work
    started = time.perf_counter()
    with context.Pool(processes, initializer=_load_photos) as pool:
        sizes = pool.map(_make_photo, jobs, chunksize=max(1, min(64, n // (4 * processes))))
    elapsed = time.perf_counter() - started
    jpeg_kb = sum(s[0] for s in sizes) / n / 1024
    png_kb = sum(s[1] for s in sizes) / max(1, n_png) / 1024
    pngs = f" and {n_png} PNGs of the same pixels (mean {png_kb:.1f} KB)" if n_png else ""
    print(
        f"made {n} JPEGs ({size[0]}x{size[1]}, quality 90, mean {jpeg_kb:.1f} KB){pngs} in "
        f"{elapsed:.1f} s on {processes} processes (not counted)",
        flush=True,
    )
    return {
        fmt: [
            Sample(root / fmt / f"{i:05d}{SUFFIX[fmt]}", "photo")
            for i in range(n if fmt == "jpeg" else n_png)
        ]
        for fmt in SUFFIX
    }


# --- CPU stages ---------------------------------------------------------------------------


def stage_costs(samples: Sequence[Sample], fmt: str, prep: Preprocessing) -> None:
    """Prints ms per image of every CPU step of a loader item, in one process and thread."""
    to_image, resize, to_float, normalise = eval_transform(prep).transforms
    whole = eval_transform(prep)
    _, height, width = prep.input_size
    totals: dict[str, float] = defaultdict(float)
    drafted: set[tuple[int, int]] = set()

    def one(path: Path) -> None:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        Image.open(io.BytesIO(data)).convert("RGB")
        t2 = time.perf_counter()
        if fmt == "jpeg":
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (width, height))
            drafted.add(image.convert("RGB").size)
        t3 = time.perf_counter()
        decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
        t4 = time.perf_counter()
        image = open_image(path, prep)
        t5 = time.perf_counter()
        x = to_image(image)
        t6 = time.perf_counter()
        x = resize(x)
        t7 = time.perf_counter()
        normalise(to_float(x))
        t8 = time.perf_counter()
        whole(open_image(path, prep))
        t9 = time.perf_counter()
        for name, seconds in (
            ("read file", t1 - t0),
            ("PIL decode, full size", t2 - t1),
            ("PIL decode with draft", t3 - t2),
            ("torchvision decode (CPU)", t4 - t3),
            ("engine open_image (read, decode)", t5 - t4),
            ("to uint8 tensor (ToImage)", t6 - t5),
            (f"resize to {height} (antialiased)", t7 - t6),
            ("to float + normalise", t8 - t7),
            ("whole loader item", t9 - t8),
        ):
            totals[name] += seconds

    with one_thread():
        for sample in samples[:3]:  # warm-up
            one(sample.path)
        totals.clear()
        drafted.clear()
        for sample in samples:
            one(sample.path)
    print(
        f"CPU stages, {fmt.upper()}, one process and one thread, mean over {len(samples)} "
        "images (ms/image):"
    )
    for name, seconds in totals.items():
        note = ""
        if name == "PIL decode with draft":
            if fmt != "jpeg":
                print(f"  {name:<34} {'-':>7}  (JPEG only)")
                continue
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(drafted))
            note = f"  (draft decoded at {sizes})"
        print(f"  {name:<34} {seconds / len(samples) * 1e3:>7.2f}{note}")
    item = totals["whole loader item"] / len(samples)
    print(f"  one loader process: at most {1 / item:.0f} images/s", flush=True)


# --- measurements -------------------------------------------------------------------------


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    prep: Preprocessing
    batch_size: int
    workers: int
    threads: int
    timed: int
    max_seconds: float
    deadline: float
    skipped: list[str] = field(default_factory=list)
    offset: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def take(self, samples: Sequence[Sample]) -> list[Sample]:
        """The next ``timed`` samples, cyclically: every measurement reads other files."""
        n = min(self.timed, len(samples))
        start = self.offset % len(samples)
        self.offset = start + n
        return [samples[(start + i) % len(samples)] for i in range(n)]

    def loader(self, samples: Sequence[Sample]) -> DataLoader:
        return DataLoader(  # as engine/gather.py builds it
            ImageDataset(samples, self.prep, eval_transform(self.prep)),
            batch_size=self.batch_size,
            num_workers=self.workers,
            pin_memory=self.cuda,
            persistent_workers=False,
        )

    def measure(self, name: str, run: Callable[[], float | None]) -> float | None:
        """``run()`` (images/s), or None when the budget is spent or it fails (printed)."""
        if time.monotonic() > self.deadline:
            self.skipped.append(name)
            return None
        try:
            return run()
        except Exception as error:  # one failure must not end the profile
            print(f"!! {name}: {type(error).__name__}: {_first_line(error)}", flush=True)
            traceback.print_exc(limit=3)
            return None

    def timed_loop(self, batches: Iterator, work: Callable[[object], int]) -> float:
        """Images/s of ``work`` over ``batches`` until they end or time is up."""
        self.sync()
        started = time.perf_counter()
        done = 0
        for batch in batches:
            done += work(batch)
            if time.perf_counter() - started > self.max_seconds:
                break
        self.sync()
        return done / (time.perf_counter() - started)

    def loader_rate(self, samples: Sequence[Sample]) -> float:
        for _ in self.loader(samples[: self.batch_size]):
            pass  # warm-up (page cache, imports in the workers)
        return self.timed_loop(iter(self.loader(self.take(samples))), lambda b: len(b[0]))

    def extraction_rate(self, model: torch.nn.Module, loader: object) -> float:
        head = find_head(model)
        done = [0]
        started = [time.perf_counter()]

        def on_batch(n: int, _total: int) -> None:
            done[0] = n

        def should_stop() -> bool:
            return time.perf_counter() - started[0] > self.max_seconds

        self.sync()
        started[0] = time.perf_counter()
        with contextlib.suppress(JobCancelled):  # time was up: the rate over what was done
            extract_features(
                model, head, loader, self.device, on_batch, should_stop, dtype=self.dtype
            )
        self.sync()
        return done[0] / (time.perf_counter() - started[0])

    def engine_extraction(self, model: torch.nn.Module, samples: Sequence[Sample]) -> float:
        head = find_head(model)
        warm = self.loader(samples[: self.batch_size])
        extract_features(model, head, warm, self.device, dtype=self.dtype)  # warm-up
        return self.extraction_rate(model, self.loader(self.take(samples)))

    def decoding_loader(self, samples: Sequence[Sample], gpu_decode: bool) -> DeviceBatches:
        """The engine's device path (engine/device_decode.py), as a job takes it."""
        return DeviceBatches(
            samples, self.prep, self.device, self.batch_size, self.threads, None, gpu_decode
        )

    def gpu_extraction(
        self, model: torch.nn.Module, samples: Sequence[Sample], gpu_decode: bool
    ) -> float:
        head = find_head(model)
        warm = self.decoding_loader(samples[: self.batch_size], gpu_decode)
        extract_features(model, head, warm, self.device, dtype=self.dtype)  # warm-up
        return self.extraction_rate(model, self.decoding_loader(self.take(samples), gpu_decode))

    def decode_rate(self, samples: Sequence[Sample], gpu_decode: bool) -> float:
        """Decoding alone, from bytes in memory: nvjpeg, or the pool's threads."""
        data = [read_file(str(s.path)) for s in self.take(samples)]
        batches = [data[i : i + self.batch_size] for i in range(0, len(data), self.batch_size)]
        with ThreadPoolExecutor(self.threads) as pool:

            def decode(batch: list[torch.Tensor]) -> int:
                if gpu_decode:
                    return len(decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device))
                return len(list(pool.map(lambda d: decode_image(d, ImageReadMode.RGB), batch)))

            decode(batches[0])  # warm-up (nvjpeg's handles and buffers)
            return self.timed_loop(iter(batches), decode)

    def prep_rate(self, samples: Sequence[Sample], gpu_decode: bool) -> float:
        """Files to normalised batches on the device, no model."""
        warm = self.decoding_loader(samples[: self.batch_size], gpu_decode)
        for _ in warm:
            pass  # warm-up
        loader = self.decoding_loader(self.take(samples), gpu_decode)
        return self.timed_loop(iter(loader), lambda b: len(b[0]))

    def pure_forward(self, model: torch.nn.Module) -> float:
        x = torch.randn(self.batch_size, *self.prep.input_size, device=self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        model.to(self.device, memory_format=torch.channels_last).eval()
        steps = math.ceil(self.timed / self.batch_size)
        try:
            with torch.inference_mode(), autocast_for(self.device, self.dtype):
                for _ in range(3 if self.cuda else 1):  # warm-up (cuDNN picks its algorithms)
                    model(x)
                return self.timed_loop(iter(range(steps)), lambda _: len(model(x)))
        finally:
            model.to(memory_format=torch.contiguous_format)

    def check(self, samples: Sequence[Sample], gpu_decode: bool) -> str:
        """How far the GPU path's inputs are from the engine's CPU transform (both normalised),
        on one batch of at most 16 images."""
        batch = samples[:16]
        ours, _ = next(iter(self.decoding_loader(batch, gpu_decode)))
        whole = eval_transform(self.prep)
        engine = torch.stack([whole(open_image(s.path, self.prep)) for s in batch])
        diff = (ours.float().cpu() - engine).abs()
        return f"mean |diff| {diff.mean():.4f}, max {diff.max():.3f} (normalised units)"


def host_to_device(bench: Bench, size: tuple[int, int]) -> None:
    """GB/s of a batch's copy to the GPU: pinned uint8 against float32 (and pageable)."""
    _, height, width = bench.prep.input_size
    n = bench.batch_size
    cases = [
        (f"uint8 {n}x3x{height}x{width}, pinned", torch.uint8, (height, width), True),
        (f"float32 {n}x3x{height}x{width}, pinned", torch.float32, (height, width), True),
        (f"float32 {n}x3x{height}x{width}, pageable", torch.float32, (height, width), False),
        (f"uint8 {n}x3x{size[1]}x{size[0]} (full size), pinned", torch.uint8, size[::-1], True),
    ]
    print("host-to-device copy of one batch (20 copies each):")
    for name, dtype, (h, w), pinned in cases:
        src = torch.zeros(n, 3, h, w, dtype=dtype)
        src = src.pin_memory() if pinned else src
        dst = torch.empty_like(src, device=bench.device)

        def copy(_: object, src: torch.Tensor = src, dst: torch.Tensor = dst, pinned=pinned) -> int:
            dst.copy_(src, non_blocking=pinned)
            return 1

        copy(None)  # warm-up
        rate = bench.timed_loop(iter(range(20)), copy)
        seconds = 1 / rate
        print(
            f"  {name:<44} {src.nbytes / 2**20:>6.1f} MiB {seconds * 1e3:>7.2f} ms "
            f"{src.nbytes / seconds / 1e9:>6.1f} GB/s",
            flush=True,
        )


def gpu_decoder_works(bench: Bench, samples: Sequence[Sample]) -> bool:
    """Whether `decode_jpeg` decodes on the CUDA device here (it needs torchvision built with
    nvjpeg); prints why not."""
    try:
        data = [read_file(str(s.path)) for s in samples[:2]]
        decode_jpeg(data, mode=ImageReadMode.RGB, device=bench.device)
        bench.sync()
        return True
    except Exception as error:
        print(
            f"!! decode_jpeg on {bench.device} failed ({type(error).__name__}: "
            f"{_first_line(error)}): the gpu "
            "columns decode on CPU threads instead",
            flush=True,
        )
        return False


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _cell(value: float | None) -> str:
    if value is None:
        return f"{'-':>11}"
    return f"{value:>11.2f}" if value < 10 else f"{value:>11.0f}"


def profile_format(
    bench: Bench,
    fmt: str,
    samples: list[Sample],
    archs: list[str],
    sample: int,
    models: Callable[[str], torch.nn.Module],
) -> None:
    print(f"\n## {fmt.upper()}", flush=True)
    bench.measure(f"{fmt} CPU stages", lambda: stage_costs(samples[:sample], fmt, bench.prep))
    gpu_decode = fmt == "jpeg" and bench.cuda and gpu_decoder_works(bench, samples)
    where = (
        "nvjpeg on the GPU" if gpu_decode else f"{bench.threads} CPU threads (PIL, as the loaders)"
    )
    print(
        f"gpu columns: decoded by {where}, resized (antialiased {bench.prep.interpolation}) and "
        f"normalised on {bench.device}" + ("" if bench.cuda else " (no GPU: to check the code)")
    )
    check = bench.measure(f"{fmt} check", lambda: bench.check(samples, gpu_decode))
    if check:
        print(f"gpu path against the engine's CPU transform, 16 images: {check}")
    loader = bench.measure(f"{fmt} cpu-loader", lambda: bench.loader_rate(samples))
    decode = bench.measure(f"{fmt} gpu-decode", lambda: bench.decode_rate(samples, gpu_decode))
    prep = bench.measure(f"{fmt} gpu-prep", lambda: bench.prep_rate(samples, gpu_decode))
    n = min(bench.timed, len(samples))
    print(
        f"images/s over {n} of {len(samples)} {fmt.upper()} files (or {bench.max_seconds:.0f} s) "
        f"each, batch {bench.batch_size}, {bench.workers} loader processes, "
        f"{precision_name(bench.dtype)}; cpu-loader, gpu-decode and gpu-prep measured once:"
    )
    print(f"{'architecture':<28}" + "".join(f"{c:>11}" for c in COLUMNS), flush=True)
    for arch in archs:  # the backbone built on first use (not at all once the budget is spent)
        extraction = bench.measure(
            f"{fmt} {arch} extraction", lambda a=arch: bench.engine_extraction(models(a), samples)
        )
        gpu = bench.measure(
            f"{fmt} {arch} gpu+fwd",
            lambda a=arch: bench.gpu_extraction(models(a), samples, gpu_decode),
        )
        pure = bench.measure(f"{fmt} {arch} pure-fwd", lambda a=arch: bench.pure_forward(models(a)))
        ratios = [a / pure if a and pure else None for a in (extraction, gpu)]
        cells = [loader, extraction, decode, prep, gpu, pure, *ratios]
        print(f"{arch:<28}" + "".join(_cell(v) for v in cells), flush=True)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000, help="JPEG files to make")
    parser.add_argument("--png-images", type=int, default=2000, help="PNG files (the first N)")
    parser.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT")
    parser.add_argument("--formats", nargs="+", choices=list(SUFFIX), default=list(SUFFIX))
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["timm:resnet18", "timm:resnet50", "timm:vit_base_patch16_224"],
    )
    parser.add_argument("--device", default=str(pick_device()))
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="the GPU's (GRAFT_PRECISION)"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--threads", type=int, default=cpus, help="gpu path's reader threads")
    parser.add_argument("--processes", type=int, default=cpus, help="to make the images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sample", type=int, default=300, help="images for the CPU stages")
    parser.add_argument("--timed", type=int, default=4000, help="images per throughput")
    parser.add_argument("--max-seconds", type=float, default=8, help="per throughput")
    parser.add_argument("--budget", type=float, default=0, help="seconds (0: no limit)")
    args = parser.parse_args()
    started = time.monotonic()
    device = torch.device(args.device)
    dtype = compute_dtype(device, args.precision)
    gpu = ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f", {torch.cuda.get_device_name(device)} (capability {major}.{minor})"
    print(
        f"device {device}{gpu}, backbone in {precision_name(dtype)}, torch {torch.__version__}, "
        f"torchvision {sys.modules['torchvision'].__version__}, {cpus} CPUs"
    )
    deadline = started + args.budget if args.budget > 0 else math.inf
    bench = Bench(
        device,
        dtype,
        PREP,
        args.batch_size,
        args.workers,
        args.threads,
        args.timed,
        args.max_seconds,
        deadline,
    )
    built: dict[str, torch.nn.Module] = {}

    def models(arch: str) -> torch.nn.Module:
        if arch not in built:
            torch.manual_seed(0)
            built[arch] = build_model(arch, 10).to(device)
        return built[arch]

    n_png = min(args.png_images, args.images) if "png" in args.formats else 0
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_photos(Path(tmp), args.images, n_png, args.size, args.processes)
        if bench.cuda:
            bench.measure("host-to-device", lambda: host_to_device(bench, args.size))
        else:
            print("device cpu: no host-to-device copy, no pinned memory (CUDA only): skipped")
        for fmt in args.formats:
            profile_format(bench, fmt, samples[fmt], args.arch, args.sample, models)
    if bench.skipped:
        print(f"\nbudget of {args.budget:.0f} s spent: skipped {', '.join(bench.skipped)}")
    print(f"\ntotal {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
