"""Model uploads that come as archives (a Hugging Face folder, an ONNX graph with its data
file), unpacked under the limits dataset archives are held to: members, bytes per member and
in all, compression ratio, no links or special files, no path outside the folder. Bytes are
copied in chunks and counted as they are written, so a bomb stops at the limit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from app.archives import ArchiveLimits, check_expansion, checked_members
from core.errors import Invalid
from engine.errors import resource_error

CHUNK = 1024 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024  # a config.json is kilobytes; this is generous


def is_archive(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(262)
    return (
        head[:4] in (b"PK\x03\x04", b"PK\x05\x06")
        or head[:2] == b"\x1f\x8b"
        or head[257:262] == b"ustar"
    )


def unpack(
    archive: Path,
    folder: Path,
    limits: ArchiveLimits,
    max_member_bytes: int,
    place: Callable[[tuple[str, ...]], tuple[str, ...] | None],
) -> None:
    """Copy the archive's files that ``place`` maps to a path (parts under ``folder``; None:
    skipped) into ``folder``. A member over ``max_member_bytes`` (``.json`` files: 16 MiB),
    the archive over ``limits`` in members, bytes or ratio, or a link or special file, is a
    422 naming the member; what was written so far is the caller's to remove."""
    size = archive.stat().st_size
    total = 0
    with archive.open("rb") as f:
        for member, parts in checked_members(f, limits, "weights"):
            target_parts = place(parts)
            if target_parts is None:
                continue
            target = folder.joinpath(*target_parts)
            if target.exists():
                shown = "/".join(target_parts)
                raise Invalid(f"the archive holds more than one {shown}", "weights")
            cap = MAX_JSON_BYTES if parts[-1].endswith(".json") else max_member_bytes
            target.parent.mkdir(parents=True, exist_ok=True)
            member_bytes = 0
            try:
                with member.open() as source, target.open("wb") as out:
                    while chunk := source.read(CHUNK):
                        member_bytes += len(chunk)
                        total += len(chunk)
                        if member_bytes > cap:
                            raise Invalid(
                                f"{member.name}: larger than the {cap} bytes allowed", "weights"
                            )
                        check_expansion(total, size, limits, "weights")
                        out.write(chunk)
            except Invalid:
                raise
            except Exception as exc:  # noqa: BLE001 (zlib, tarfile, zipfile and OS errors alike)
                if resource_error(exc) is not None:
                    raise  # the server's disk, not the archive
                raise Invalid(
                    f"{member.name}: unreadable archive member ({type(exc).__name__}: {exc})",
                    "weights",
                ) from None


def kind_problem(architecture: str, upload: Path) -> str | None:
    """Why the upload cannot be a model file of ``architecture``'s family, told from its first
    bytes (no parsing): a refusal that costs no sandbox. None when it may be one."""
    with upload.open("rb") as f:
        head = f.read(16)
    size = upload.stat().st_size
    zipped = head[:4] in (b"PK\x03\x04", b"PK\x05\x06")
    family = architecture.partition(":")[0]
    if family == "keras":
        return None if zipped else "a .keras file is a zip archive, and this file is not one"
    if family == "onnx":
        tag = head[0] if head else 0
        protobuf = tag & 0x07 in (0, 2) and 1 <= tag >> 3 <= 20
        if protobuf or zipped or is_archive(upload):
            return None
        return "this file is neither an ONNX model nor a .zip of one and its data file"
    if family == "hf":
        return None  # an archive: unpacked under limits
    header = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    safetensors = 0 < header <= size - 8 and head[8:9] == b"{"
    if safetensors or zipped or head[:1] == b"\x80":
        return None
    return (
        "weights must be a .safetensors file or a state dict saved by torch.save; this file "
        "is neither"
    )
