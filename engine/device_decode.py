"""Clean views made where the backbone runs: JPEGs decoded by nvJPEG and resized on the GPU,
other files on threads, every batch normalised there, the next made while the current one runs.

On a GPU the loader processes (engine/data.py: PIL decodes, resizes and normalises on the CPU,
then a float32 batch is copied over) are the wall, not the backbone (bench/RESULTS.md). Here,
per batch of images:

* the files are read on a thread pool, two batches ahead;
* JPEGs are decoded by ``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG on a GPU) in
  runs bounded in count and pixels (engine/nvjpeg.py). JPEGs it should not or cannot decode
  (four colour components, arithmetic coding, a file it refuses) and every other format are
  decoded on the pool's threads as the loaders do (``open_image``, with libjpeg's DCT scaling
  of large JPEGs, then ``resize_transform``), their uint8 pixels copied over;
* the images are resized on the device, those of one size together, antialiased like
  ``v2.Resize``, to uint8 (one twice the input size or more first shrunk by block means, by the
  factor of libjpeg's DCT scaling in ``open_image``; one the device cannot resize goes to the
  CPU): the pixels engine/decoded.py keeps, and reads instead of all this when it holds them;
* the uint8 batch is normalised there, as ``normalise_transform`` does it.

A side thread makes batch k+1 (on its own CUDA stream) while the backbone runs batch k.

``plan``: ``auto`` takes this path on a CUDA device whose torchvision decodes JPEGs there, for
bilinear and bicubic models; ``device`` on any device (on a CPU every file is then decoded on
the threads as the loaders would, their pixels bit for bit); ``loaders`` never. Augmented views
always go through the loaders: their transforms work on PIL images.

nvJPEG's IDCT and chroma upsampling are not libjpeg's, nor block means its DCT scaling, so
pixels differ by a level or so: the features agree with the loaders' within the tolerance
tests/engine/test_cuda.py states, and decoded pixels are kept under their decoder's name.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode

from engine.data import Sample, open_image, resize_transform
from engine.decoded import PIL, DecodedRows
from engine.nvjpeg import (
    chunks,
    decode_on,
    decodes_jpeg_on,
    jpeg_frame,
    raise_if_device_failed,
)
from engine.preprocessing import Preprocessing

DECODE_CHOICES = ("auto", "device", "loaders")
FIT_PIXELS = 50_000_000  # resized together at most (0.6 GB as float32 RGB)
DEVICE_THREADS = min(8, os.cpu_count() or 1)  # file readers when no loader count is set
RESIZABLE = ("bilinear", "bicubic")  # what F.interpolate antialiases


@dataclass(frozen=True)
class Decoding:
    """Where a pass's clean views are made (``plan``), and whose pixels they are."""

    on_device: bool  # DeviceBatches, not the loaders
    jpeg_on_device: bool  # JPEGs by decode_jpeg on the device (nvJPEG)
    device_type: str

    @property
    def decoder(self) -> str:
        """Whose pixels (engine/decoded.py keys its entries by it)."""
        return f"decode_jpeg:{self.device_type}" if self.jpeg_on_device else PIL

    def report(self, made: Iterable[DeviceBatches] = ()) -> dict:
        """For a job's metrics: where, whose pixels, and the images by where they came from."""
        out: dict = {"where": "device" if self.on_device else "loaders", "decoder": self.decoder}
        if self.on_device:
            counted = sum((m.decoded for m in made), Counter())
            out["images"] = dict(sorted(counted.items()))
        return out


def plan(decode: str, device: torch.device, prep: Preprocessing) -> Decoding:
    """``auto``: on the device where it decodes JPEGs, for bilinear and bicubic models;
    ``device``: on the device whatever it is; ``loaders``: never (see the module's text)."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    nvjpeg = decode != "loaders" and prep.interpolation in RESIZABLE and decodes_jpeg_on(device)
    on_device = nvjpeg or (decode == "device" and prep.interpolation in RESIZABLE)
    return Decoding(on_device, nvjpeg, device.type)


@dataclass
class DeviceBatches:
    """``(inputs, indices)`` batches of the clean views of ``samples``, made on ``device`` (the
    module's text); ``dataset`` is what ``extract_features`` counts. ``jpeg_on_device``: JPEGs
    go to ``decode_jpeg`` on ``device`` (default: where that is nvJPEG). ``rows``: the
    decoded-pixels entry to read (a stored one) or to fill. ``decoded`` counts the images by
    where their pixels came from: ``device``, ``cpu`` or ``stored``."""

    samples: Sequence[Sample]
    prep: Preprocessing
    device: torch.device
    batch_size: int
    threads: int = 0  # file readers (0: DEVICE_THREADS)
    rows: DecodedRows | None = None
    jpeg_on_device: bool | None = None
    decoded: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.jpeg_on_device is None:
            self.jpeg_on_device = decodes_jpeg_on(self.device)
        self.threads = self.threads or DEVICE_THREADS
        channels, height, width = self.prep.input_size
        self._size = (height, width)
        self._mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        self._resize = resize_transform(self.prep)
        self._cuda = self.device.type == "cuda"
        if self._cuda and self.device.index is None:  # one nvJPEG decoder per named device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._interpolation = "bicubic" if self.prep.interpolation == "bicubic" else "bilinear"
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(self.prep.mean, device=self.device).view(shape)
        self._std = torch.tensor(self.prep.std, device=self.device).view(shape)

    @property
    def dataset(self) -> Sequence[Sample]:
        return self.samples

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        made: queue.Queue = queue.Queue(maxsize=1)  # one batch waits while one runs
        stop = threading.Event()
        side = torch.cuda.Stream(self.device) if self._cuda else None
        maker = threading.Thread(
            target=self._make_all, args=(made, stop, side), name="graft-decode", daemon=True
        )
        maker.start()
        try:
            while (item := made.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                inputs, index, ready = item
                if ready is not None:  # the side stream's work on it comes first
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    inputs.record_stream(current)
                yield inputs, index
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:  # unblock a maker waiting to hand over a batch
                    made.get_nowait()
            maker.join()

    def _make_all(
        self, made: queue.Queue, stop: threading.Event, side: torch.cuda.Stream | None
    ) -> None:
        def hand(item: object) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    made.put(item, timeout=0.1)
                    return True
            return False

        try:
            streamed = torch.cuda.stream(side) if side is not None else contextlib.nullcontext()
            with ThreadPoolExecutor(self.threads) as pool, torch.inference_mode(), streamed:
                try:
                    for start, items in self._read_ahead(pool, stop):
                        pixels = self._pixels(start, items)
                        inputs = self._normalise(pixels)
                        ready = None
                        if side is not None:
                            ready = torch.cuda.Event()
                            ready.record(side)
                        index = torch.arange(start, start + len(pixels))
                        if not hand((inputs, index, ready)):
                            return
                finally:
                    pool.shutdown(cancel_futures=True)  # reads not begun are not waited for
        except BaseException as error:  # noqa: BLE001 -- raised where the batches are taken
            hand(error)
            return
        hand(None)

    def _read_ahead(
        self, pool: ThreadPoolExecutor, stop: threading.Event
    ) -> Iterator[tuple[int, list[Future] | None]]:
        """``(start, reads)`` per batch, the files of the next two batches being read (None:
        the batch's pixels are stored)."""
        starts = range(0, len(self.samples), self.batch_size)
        stored = self.rows is not None and self.rows.stored

        def submit(start: int) -> list[Future] | None:
            if stored:
                return None
            batch = self.samples[start : start + self.batch_size]
            return [pool.submit(self._read, sample) for sample in batch]

        ahead = deque(submit(s) for s in starts[:2])
        for k, start in enumerate(starts):
            if stop.is_set():
                return
            reads = ahead.popleft()
            if k + 2 < len(starts):
                ahead.append(submit(starts[k + 2]))
            yield start, reads

    def _read(self, sample: Sample) -> tuple[torch.Tensor, int]:
        """On a pool thread: a JPEG's bytes for ``decode_jpeg`` (1-D) and its pixel count, or
        the resized uint8 pixels of any other file (3-D) and 0."""
        if self.jpeg_on_device:
            data = sample.path.read_bytes()
            frame = jpeg_frame(data)
            if frame is not None:
                return torch.frombuffer(
                    bytearray(data), dtype=torch.uint8
                ), frame.height * frame.width
        return self._on_cpu(sample), 0

    def _on_cpu(self, sample: Sample) -> torch.Tensor:
        return self._resize(open_image(sample.path, self.prep)).as_subclass(torch.Tensor)

    def _pixels(self, start: int, reads: list[Future] | None) -> torch.Tensor:
        """The batch's uint8 ``N x C x H x W`` pixels on the device."""
        if reads is None:
            stop = min(start + self.batch_size, len(self.samples))
            self.decoded["stored"] += stop - start
            assert self.rows is not None
            return self._to_device(self.rows.block(start, stop))
        items, sizes = zip(*(f.result() for f in reads), strict=True)
        made: list[torch.Tensor] = list(items)
        on_cpu = {i for i, size in enumerate(sizes) if not size}  # decoded as the loaders do
        for chunk in chunks([i for i, size in enumerate(sizes) if size], sizes):
            decoded = decode_on(self.device, [items[i] for i in chunk], self._mode)
            fitted = iter(self._fit_all([image for image in decoded if image is not None]))
            for i, image in zip(chunk, decoded, strict=True):
                image = None if image is None else next(fitted)
                if image is None:  # refused by decode_jpeg, or not resizable there
                    made[i] = self._on_cpu(self.samples[start + i])
                    on_cpu.add(i)
                else:
                    made[i] = image
        if len(made) > len(on_cpu):
            self.decoded["device"] += len(made) - len(on_cpu)
        if on_cpu:
            order = sorted(on_cpu)
            copied = self._to_device(torch.stack([made[i] for i in order]))
            for i, image in zip(order, copied, strict=True):
                made[i] = image
            self.decoded["cpu"] += len(order)
        pixels = torch.stack(made)
        if self.rows is not None:
            self.rows.write(start, pixels)  # a copy back: what the next pass reads
        return pixels

    def _fit_all(self, images: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded images at the input size: images of one size resized together (at most
        ``FIT_PIXELS`` at a time); None for those the device cannot resize."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for k, image in enumerate(images):
            groups[tuple(image.shape)].append(k)
        for shape, members in groups.items():
            step = max(1, FIT_PIXELS // (shape[-1] * shape[-2]))
            for first in range(0, len(members), step):
                part = members[first : first + step]
                fitted = self._fit(torch.stack([images[k] for k in part]))
                for n, k in enumerate(part):
                    out[k] = None if fitted is None else fitted[n]
        return out

    def _fit(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decoded ``N x C x h x w`` images at the input size, as uint8, or None where the
        device cannot resize them. Images at least twice the input size are first shrunk by
        the factor libjpeg's DCT scaling takes in ``open_image`` (2, 4 or 8: block means),
        then resized antialiased, as ``v2.Resize``."""
        height, width = self._size
        if tuple(x.shape[-2:]) == self._size:
            return x
        factor = min(x.shape[-1] // width, x.shape[-2] // height)
        factor = next((f for f in (8, 4, 2) if factor >= f), 1)
        try:
            y = x.float()
            if factor > 1:
                y = F.avg_pool2d(y, factor, factor, ceil_mode=True).round_()
            y = F.interpolate(y, self._size, mode=self._interpolation, antialias=True)
        except RuntimeError as error:  # e.g. a panorama past the kernel's shared memory
            raise_if_device_failed(error)
            return None
        return y.round_().clamp_(0, 255).to(torch.uint8)

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self._cuda:
            return pixels
        return pixels.pin_memory().to(self.device, non_blocking=True)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """As ``normalise_transform``: to float in [0, 1], less the mean, over the std."""
        inputs = pixels.to(torch.float32).mul_(1.0 / 255).sub_(self._mean).div_(self._std)
        return inputs.contiguous(memory_format=torch.channels_last)
