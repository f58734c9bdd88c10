"""nvJPEG: what it may decode, whether it is here, and decoding with it. A JPEG's frame header is
read for its coding, colour components and size (nvJPEG takes Huffman-coded JPEGs of one or
three components); one small JPEG is decoded on the device, once per process and GPU, to know
whether this torchvision decodes there (a CUDA build with nvJPEG); files are decoded in runs
bounded in count and pixels, a file it refuses left to the CPU."""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)
CHUNK = 64  # JPEGs per decode_jpeg call, and at most CHUNK_PIXELS decoded (0.6 GB of RGB)
CHUNK_PIXELS = 200_000_000
# a sticky CUDA error and out of memory (the first is torch 2.8's: getattr for older ones)
_DEVICE_ERRORS = tuple(
    e
    for e in (getattr(torch, "AcceleratorError", None), torch.cuda.OutOfMemoryError)
    if e is not None
)
_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman: what nvJPEG decodes
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
# torchvision 0.29 warns on every decode that TorchCodec will take its decoders over; until
# then decode_jpeg is the one on the device (TorchCodec's decode_jpeg is its successor)
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)


class Frame(NamedTuple):
    components: int
    height: int
    width: int


def jpeg_frame(data: bytes) -> Frame | None:
    """The frame of an 8-bit Huffman-coded JPEG nvJPEG can take (1 colour component, or 3 in
    YCbCr), else None: not a JPEG, four components (CMYK, YCCK), three stored as RGB (Adobe's
    transform 0, which PIL honours), 12-bit samples, arithmetic or lossless coding, a broken
    header."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at = 2
    adobe_rgb = False
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _NO_LENGTH:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xEE and length >= 12 and data[at + 4 : at + 9] == b"Adobe":
            adobe_rgb = at + 15 < len(data) and data[at + 15] == 0
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF or at + 10 > len(data) or data[at + 4] != 8:
                return None
            components = data[at + 9]
            if components not in (1, 3) or (components == 3 and adobe_rgb):
                return None
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return Frame(components, height, width) if height and width else None
        if marker == 0xDA or length < 2:  # image data before a frame header: broken
            return None
        at += 2 + length
    return None


def decodes_jpeg_on(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on ``device``: a CUDA device, with nvJPEG."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _nvjpeg_works(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _nvjpeg_works(index: int) -> bool:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "JPEG")
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    try:
        image = decode_jpeg([data], mode=ImageReadMode.RGB, device=torch.device("cuda", index))[0]
        torch.cuda.synchronize(index)
    except Exception as error:  # noqa: BLE001 -- whatever fails, the loaders decode
        log.warning("JPEGs are decoded on the CPU: decode_jpeg on cuda:%d failed: %s", index, error)
        return False
    return tuple(image.shape) == (3, 16, 16)


def decode_on(
    device: torch.device, data: list[torch.Tensor], mode: ImageReadMode
) -> list[torch.Tensor | None]:
    """``decode_jpeg`` of the files' bytes on ``device``; None for a file it refuses (decoded
    one by one once the call fails). The device's own failures are raised."""
    try:
        return list(_decode_jpeg(device, data, mode))
    except RuntimeError as error:  # one file spoils the call: each alone
        raise_if_device_failed(error)
        images: list[torch.Tensor | None] = []
        for one in data:
            try:
                images.append(_decode_jpeg(device, [one], mode)[0])
            except RuntimeError as each:
                raise_if_device_failed(each)
                images.append(None)
        return images


def _decode_jpeg(
    device: torch.device, data: list[torch.Tensor], mode: ImageReadMode
) -> list[torch.Tensor]:
    if device.type == "cuda":
        # decode_jpeg allocates its outputs on the current stream but decodes on a stream of
        # its own that does not wait for the current one first (pytorch/vision#9606): memory
        # freed with kernels still queued could be written under them
        torch.cuda.current_stream(device).synchronize()
    return decode_jpeg(data, mode=mode, device=device)


def raise_if_device_failed(error: RuntimeError) -> None:
    """A file's failure is left to the CPU; the device's own (a sticky CUDA error, out of
    memory) is raised."""
    if isinstance(error, _DEVICE_ERRORS):
        raise error


def chunks(indices: list[int], sizes: Sequence[int]) -> Iterator[list[int]]:
    """``indices`` in runs of at most ``CHUNK`` images and ``CHUNK_PIXELS`` decoded pixels
    (``sizes[i]`` each; one image however large)."""
    run: list[int] = []
    pixels = 0
    for i in indices:
        if run and (len(run) == CHUNK or pixels + sizes[i] > CHUNK_PIXELS):
            yield run
            run, pixels = [], 0
        run.append(i)
        pixels += sizes[i]
    if run:
        yield run
