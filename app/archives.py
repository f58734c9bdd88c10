"""Reading an uploaded archive safely: member by member, never extracted as a whole.

Each member's path is checked, only regular files are read, sizes are counted while streaming
(headers lie), compression ratios are bounded, and each image is decoded before it is kept.
Unsafe archives are refused whole; files that are not images are reported as rejected. The
result, images by label (deduplicated), is packed as a tar for the store (``app.datasets``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from core.errors import Invalid
from core.settings import Settings
from engine.reference import conflicting

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
# Only these decoders ever see uploaded bytes; PIL's other plugins are never tried.
ALLOWED_DECODERS = list(IMAGE_FORMATS)
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
RATIO_CHECK_AFTER = 16 * 1024 * 1024  # compression ratios of tiny archives say nothing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_member_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 16 * 1024**3
    max_ratio: float = 200.0
    max_image_pixels: int = 64_000_000


def archive_limits(settings: Settings) -> ArchiveLimits:
    """The limits an upload, or an import, is held to (GRAFT_MAX_*)."""
    return ArchiveLimits(
        max_members=settings.max_archive_members,
        max_member_bytes=settings.max_member_bytes,
        max_total_bytes=settings.max_extracted_bytes,
        max_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
    )


@dataclass
class Member:
    name: str
    kind: str  # file | dir | link | device
    open: Callable[[], BinaryIO]  # for files


@dataclass
class Extracted:
    labels: dict[str, int]
    rejected: list[dict[str, str]]
    images: list[tuple[str, str, Path]] = field(default_factory=list)  # (label, ext, file)


def _sniff(f: BinaryIO) -> str:
    head = f.read(512)
    f.seek(0)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise Invalid("the archive must be a .zip, .tar or .tar.gz file", "archive")


def iter_members(f: BinaryIO) -> Iterator[Member]:
    """Members of a zip or tar, in order, without extracting anything."""
    if _sniff(f) == "zip":
        try:
            archive = zipfile.ZipFile(f)  # noqa: SIM115 - closed by its caller's upload file
        except zipfile.BadZipFile as exc:
            raise Invalid(f"unreadable zip archive: {exc}", "archive") from None
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if info.is_dir():
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "link"
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # no type bits: a plain file
                kind = "device"
            else:
                kind = "file"
            if info.flag_bits & 0x1:
                raise Invalid(f"{info.filename}: encrypted archive members are refused", "archive")
            yield Member(info.filename, kind, lambda info=info: archive.open(info))
        return
    try:
        with tarfile.open(fileobj=f, mode="r:*") as archive:
            for info in archive:
                if info.isdir():
                    kind = "dir"
                elif info.issym() or info.islnk():
                    kind = "link"
                elif info.isreg():
                    kind = "file"
                else:
                    kind = "device"
                yield Member(info.name, kind, lambda info=info: archive.extractfile(info))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise Invalid(f"unreadable tar archive: {exc}", "archive") from None


def safe_parts(name: str) -> tuple[str, ...]:
    """The member's path as parts, or :class:`Invalid` for absolute and ``..`` paths."""
    if "\x00" in name:
        raise Invalid("archive member names must not contain NUL", "archive")
    normalised = name.replace("\\", "/")
    path = PurePosixPath(normalised)
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise Invalid(f"{name}: absolute paths are refused", "archive")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if ".." in parts:
        raise Invalid(f"{name}: paths with '..' are refused", "archive")
    return parts


def _unprintable(name: str) -> bool:
    return not name.isprintable()


def is_ignored(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] in IGNORED_NAMES


def verify_image(data: bytes | Path, max_pixels: int) -> str:
    """Decode the whole image (its bytes, or a file); return its file extension, or raise
    ``ValueError`` with why not."""

    def source() -> BinaryIO | Path:
        return io.BytesIO(data) if isinstance(data, bytes) else data

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source(), formats=ALLOWED_DECODERS) as im:
                fmt = im.format
                width, height = im.size
                if width * height > max_pixels:
                    raise ValueError(
                        f"image of {width}x{height} pixels is over the {max_pixels} pixel limit"
                    )
                im.verify()
            with Image.open(source(), formats=[fmt]) as im:
                im.load()
        except UnidentifiedImageError:
            raise ValueError(
                f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)})"
            ) from None
        except (
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as exc:
            raise ValueError(str(exc).split(". ")[0]) from None
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise ValueError(f"not a decodable image ({exc})") from None
    return IMAGE_FORMATS[fmt]


def folder_problem(parts: tuple[str, ...]) -> dict[str, str] | None:
    """The rejection of a file whose path cannot make it an example of a label, or None."""
    if len(parts) < 2:
        return {"path": "/".join(parts), "reason": "not inside a label folder"}
    if any(_unprintable(p) or len(p) > 200 for p in parts[:-1]):
        return {
            "path": "/".join(parts).encode("unicode_escape").decode(),
            "reason": "folder names must be printable and at most 200 characters",
        }
    return None


def checked_members(
    f: BinaryIO, limits: ArchiveLimits, field: str = "archive"
) -> Iterator[tuple[Member, tuple[str, ...]]]:
    """The archive's files with their path parts: more than ``limits.max_members`` entries,
    a link or special file, or a path outside the folder is a 422 (on ``field``)."""
    for count, member in enumerate(iter_members(f), start=1):
        if count > limits.max_members:
            raise Invalid(f"the archive has more than {limits.max_members} entries", field)
        parts = safe_parts(member.name)
        if member.kind in ("link", "device"):
            raise Invalid(f"{member.name}: links and special files are refused", field)
        if member.kind == "file" and parts:
            yield member, parts


def check_expansion(total: int, archive_size: int, limits: ArchiveLimits, field: str) -> None:
    """422 once the bytes unpacked so far are past the size or compression-ratio limit."""
    if total > limits.max_total_bytes:
        raise Invalid("the archive expands beyond the size limit", field)
    if total > RATIO_CHECK_AFTER and total > limits.max_ratio * max(archive_size, 1):
        raise Invalid("the archive's compression ratio is beyond the limit", field)


def _read_capped(stream: BinaryIO, cap: int) -> bytes | None:
    """At most ``cap`` bytes, or None when the member holds more (whatever its header says)."""
    data = stream.read(cap + 1)
    return None if len(data) > cap else data


def extract_images(
    f: BinaryIO, archive_size: int, limits: ArchiveLimits, workdir: Path
) -> Extracted:
    """Verify every member of the archive and copy the good images into ``workdir``."""
    accepted: list[tuple[tuple[str, ...], str, Path]] = []
    rejected: list[dict[str, str]] = []
    total = 0
    for member, parts in checked_members(f, limits):
        if is_ignored(parts):
            continue
        shown = "/".join(parts)
        try:
            with member.open() as stream:
                data = _read_capped(stream, limits.max_member_bytes)
        except (
            zipfile.BadZipFile,
            tarfile.TarError,
            OSError,
            EOFError,
            zlib.error,
            NotImplementedError,
            RuntimeError,
        ) as exc:
            raise Invalid(f"{member.name}: unreadable archive member ({exc})", "archive") from None
        if data is None:
            rejected.append({"path": shown, "reason": "file larger than the per-file limit"})
            continue
        total += len(data)
        check_expansion(total, archive_size, limits, "archive")
        if problem := folder_problem(parts):
            rejected.append(problem)
            continue
        try:
            ext = verify_image(data, limits.max_image_pixels)
        except ValueError as exc:
            rejected.append({"path": shown, "reason": str(exc)})
            continue
        target = workdir / f"{len(accepted):07d}.{ext}"
        target.write_bytes(data)
        accepted.append((parts, ext, target, hashlib.sha256(data).hexdigest()))
    return _label(accepted, rejected)


def _label(
    accepted: list[tuple[tuple[str, ...], str, Path, str]], rejected: list[dict[str, str]]
) -> Extracted:
    """The top-level folder is the label; one folder wrapping all label folders is tolerated.
    An image counts once by its bytes: its copies under the same label are skipped, and an
    image under two labels is left out of both (it cannot be an example of either), each
    named in ``rejected``."""
    tops = {parts[0] for parts, *_ in accepted}
    wrapped = len(tops) == 1 and all(len(parts) >= 3 for parts, *_ in accepted)
    labelled = [
        (parts[1] if wrapped else parts[0], ext, path, digest, "/".join(parts))
        for parts, ext, path, digest in accepted
    ]
    images = deduplicate(labelled, rejected)
    counts = Counter(label for label, _, _ in images)
    return Extracted(dict(sorted(counts.items())), rejected, images)


def deduplicate(
    labelled: list[tuple[str, str, Path, str, str]], rejected: list[dict[str, str]]
) -> list[tuple[str, str, Path]]:
    """``(label, ext, file)`` of each distinct image of ``labelled`` (``(label, ext, file,
    sha256, path as the user named it)``): copies under the same label are skipped, an image
    under two labels is left out of both; each is named in ``rejected``."""
    conflicted = conflicting((digest, label) for label, _, _, digest, _ in labelled)
    first: dict[tuple[str, str], str] = {}
    for label, _, _, digest, shown in labelled:
        first.setdefault((digest, label), shown)
    images = []
    for label, ext, path, digest, shown in labelled:
        if digest in conflicted:
            others = ", ".join(repr(x) for x in conflicted[digest] if x != label)
            rejected.append(
                {
                    "path": shown,
                    "reason": f"the same image is also under {others}: an image cannot be an "
                    "example of two labels, so it is left out of both",
                }
            )
        elif first[(digest, label)] != shown:
            rejected.append(
                {
                    "path": shown,
                    "reason": f"the same image as {first[(digest, label)]}: counted once",
                }
            )
        else:
            images.append((label, ext, path))
    return images


def pack_images(images: list[tuple[str, str, Path]], target: Path) -> None:
    """The stored form of every dataset: a tar of ``<label>/<n>.<ext>``."""
    numbering: Counter[str] = Counter()
    with tarfile.open(target, "w") as tar:
        for label, ext, path in images:
            numbering[label] += 1
            tar.add(path, arcname=f"{label}/{numbering[label]:06d}.{ext}")
