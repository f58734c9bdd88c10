"""Decoded images kept between jobs: a set of images' pixels at the model's input size, so that
the next job or evaluation on the same images reads them instead of decoding and resizing.

A job's clean views (every image once, untouched by augmentation) go through the model's eval
transform: decode, antialiased resize to the input size (uint8), then to float and normalise.
The cache keeps the uint8 step, which is where the work is: one memory-mapped file per set of
images (``<key>.u8``, ``images x C x H x W`` bytes), its key the images' digests in order and
what shapes the pixels (channels, size, interpolation). Mean and std are applied after it, so
models that differ only in those share an entry; the features are bit for bit those of a pass
that decoded (tests/engine/test_decoded.py).

Entries live in one folder per scope (the worker names one per dataset, and deletes it with the
dataset) under a root whose total is bounded: writing an entry first removes the least
recently used ones (by modification time, which a read renews) until it fits, and an entry that
cannot fit (in the budget, or on the disk above its reserve) is not written. An entry is
written under a temporary name, its blocks taken at once, by the pass that decodes (its loader
processes write their rows), and renamed into place only when the pass succeeded, so a reader
never sees half of one; a file of the wrong size is ignored and removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.preprocessing import Preprocessing

SUFFIX = ".u8"
PIL = "pil"  # the loaders' decoder (engine/data.py: open_image, resize_transform)


def pixels_key(digests: Sequence[str], prep: Preprocessing, decoder: str = PIL) -> str:
    """The key of a set of images (in this order) at the pixels ``prep`` asks for, as
    ``decoder`` makes them (engine/device_decode.py: nvJPEG's pixels are not libjpeg's)."""
    h = hashlib.sha256()
    shaping = (tuple(prep.input_size), prep.interpolation)
    h.update(repr(shaping if decoder == PIL else (*shaping, decoder)).encode())
    for digest in digests:
        h.update(digest.encode() + b"\n")
    return h.hexdigest()[:32]


@dataclass
class DecodedRows:
    """Rows ``offset ..`` of one entry, for one dataset of images: read from a complete entry
    (``stored``), or written into one being made, one image at a time, from whichever process
    decodes it. Each process maps the file for itself (a loader worker gets the path)."""

    shape: tuple[int, int, int]
    path: Path
    stored: bool
    offset: int = 0
    _mapped: np.memmap | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict:  # to a loader process: the path, not the mapping
        return self.__dict__ | {"_mapped": None}

    def pixels(self, index: int, decode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The uint8 ``C x H x W`` pixels of image ``index``: stored, or ``decode()``d (and
        written, when the entry is being made)."""
        if self.stored:
            # no copy: normalising makes the float tensor that leaves this item
            return self.block(index, index + 1)[0]
        pixels = decode()
        self.write(index, pixels.unsqueeze(0))
        return pixels

    def _map(self) -> np.memmap:
        if self._mapped is None:
            # "c": a read-only view torch takes without a warning; "r+": rows are written
            self._mapped = np.memmap(self.path, dtype=np.uint8, mode="c" if self.stored else "r+")
        return self._mapped

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Stored images ``start .. stop`` as one uint8 ``N x C x H x W`` tensor (no copy)."""
        row = int(np.prod(self.shape))
        first = (self.offset + start) * row
        rows = self._map()[first : first + (stop - start) * row]
        return torch.from_numpy(rows).view(stop - start, *self.shape)

    def write(self, start: int, pixels: torch.Tensor) -> None:
        """Write the uint8 ``N x C x H x W`` pixels of images ``start ..`` (an entry being
        made)."""
        if tuple(pixels.shape[1:]) != self.shape or pixels.dtype != torch.uint8:
            raise ValueError(
                f"decoded {pixels.dtype} pixels of {list(pixels.shape[1:])}, not uint8 {self.shape}"
            )
        row = int(np.prod(self.shape))
        first = (self.offset + start) * row
        self._map()[first : first + len(pixels) * row] = pixels.cpu().numpy().reshape(-1)

    def part(self, offset: int) -> DecodedRows:
        """The same entry from row ``offset`` on (the next dataset of the pass)."""
        return DecodedRows(self.shape, self.path, self.stored, self.offset + offset)


@dataclass
class Entry:
    """What a pass found or is making: ``rows`` to hand its datasets; ``commit()`` once the
    pass succeeded (a new entry becomes readable), ``abort()`` otherwise."""

    key: str
    images: int
    rows: DecodedRows | None  # None: no cache (disabled, or the entry cannot fit)
    hit: bool = False
    bytes: int = 0
    final: Path | None = None

    def commit(self) -> None:
        if self.rows is not None and not self.rows.stored and self.final is not None:
            try:
                os.replace(self.rows.path, self.final)
            except FileNotFoundError:  # the sweep took it for a killed pass's: not kept
                self.final = None
            self.rows = None

    def abort(self) -> None:
        if self.rows is not None and not self.rows.stored:
            self.rows.path.unlink(missing_ok=True)
            self.rows = None

    def report(self) -> dict:
        """For a job's metrics: whether the pixels were read (``hit``), written, or neither."""
        state = "hit" if self.hit else "stored" if self.final is not None else "off"
        return {"state": state, "images": self.images, "bytes": self.bytes}


@contextlib.contextmanager
def filling(entry: Entry | None) -> Iterator[None]:
    """Around the pass that reads or makes ``entry``: a new one is committed if the pass
    succeeds, and removed if it does not."""
    try:
        yield
    except BaseException:
        if entry is not None:
            entry.abort()
        raise
    if entry is not None:
        entry.commit()


class DecodedCache:
    """Entries under ``root / scope``, all of ``root`` at most ``budget_bytes``; none is
    written that would leave less than ``reserve_bytes`` free on its disk."""

    def __init__(self, root: Path, scope: str, budget_bytes: int, reserve_bytes: int = 0) -> None:
        self.root = root
        self.folder = root / scope
        self.budget_bytes = budget_bytes
        self.reserve_bytes = reserve_bytes

    def entry(self, digests: Sequence[str], prep: Preprocessing, decoder: str = PIL) -> Entry:
        """The stored entry of these images at ``prep``'s pixels as ``decoder`` makes them, or
        a new one to make."""
        channels, height, width = prep.input_size
        shape = (channels, height, width)
        key = pixels_key(digests, prep, decoder)
        size = len(digests) * channels * height * width
        final = self.folder / f"{key}{SUFFIX}"
        if not digests or self.budget_bytes <= 0:
            return Entry(key, len(digests), None)
        with contextlib.suppress(FileNotFoundError):
            if final.stat().st_size == size:
                os.utime(final)  # the most recently used
                rows = DecodedRows(shape, final, stored=True)
                return Entry(key, len(digests), rows, hit=True, bytes=size)
            final.unlink()  # the wrong size: not an entry of these images
        if size > self.budget_bytes or not self._make_room(size):
            return Entry(key, len(digests), None)
        self.folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.folder).free - size < self.reserve_bytes:
            return Entry(key, len(digests), None)  # the disk's floor comes first
        partial = self.folder / f"{key}.{secrets.token_hex(4)}.partial"
        try:
            # the blocks are taken now: a full disk is an error here, not a SIGBUS in a
            # loader process writing into a mapped hole later
            with partial.open("wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        except OSError:
            partial.unlink(missing_ok=True)
            return Entry(key, len(digests), None)
        rows = DecodedRows(shape, partial, stored=False)
        return Entry(key, len(digests), rows, bytes=size, final=final)

    def _make_room(self, size: int) -> bool:
        """Remove the least recently used entries until ``size`` more bytes fit."""
        entries = []
        for path in self.root.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        used = sum(s for _, s, _ in entries)
        for _, stored, path in sorted(entries):
            if used + size <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)  # a pass reading it keeps its mapping
            used -= stored
        return used + size <= self.budget_bytes
