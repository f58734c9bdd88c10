"""What nvJPEG may decode, and whether it is here: a JPEG's frame header read for its coding
and colour components (nvJPEG takes Huffman-coded JPEGs of one or three components), and one
small JPEG decoded on the device, once per process and GPU, to know whether this torchvision
decodes there (a CUDA build with nvJPEG)."""

from __future__ import annotations

import functools
import io
import logging
import warnings

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

log = logging.getLogger(__name__)
_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman: what nvJPEG decodes
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
# torchvision 0.29 warns on every decode that TorchCodec will take its decoders over; until
# then decode_jpeg is the one on the device (TorchCodec's decode_jpeg is its successor)
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)


def jpeg_components(data: bytes) -> int | None:
    """The colour components of an 8-bit Huffman-coded JPEG nvJPEG can take (1, or 3 in
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
            if components == 3 and adobe_rgb:
                return None
            return components if components in (1, 3) else None
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
