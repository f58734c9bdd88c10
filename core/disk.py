"""Free space under the data folder. Uploads that would not fit are refused (507) before a
byte is written, /readyz reports a disk below the floor, and a worker does not start a job on
a disk below it, stops one whose disk falls below it (its heartbeat looks every second), and
does not write a version's files that would take it below. The floor is
``GRAFT_MIN_FREE_DISK_MB``."""

from __future__ import annotations

import shutil

from core.errors import InsufficientStorage
from core.settings import MiB, Settings


def free_bytes(settings: Settings) -> int:
    return shutil.disk_usage(settings.data_dir).free


def has_room(settings: Settings, needed: int = 0) -> bool:
    return free_bytes(settings) - needed >= settings.min_free_disk_mb * MiB


def ensure_room(settings: Settings, needed: int, what: str) -> None:
    """Raise 507 unless ``needed`` bytes fit under the data folder above the floor."""
    free = free_bytes(settings)
    if free - needed < settings.min_free_disk_mb * MiB:
        raise InsufficientStorage(
            f"{what} needs about {_mb(needed)} MB of disk, and the server keeps "
            f"{settings.min_free_disk_mb} MB free (GRAFT_MIN_FREE_DISK_MB); only {_mb(free)} MB "
            "are free under its data folder. Retry once space has been freed"
        )


def below_floor(settings: Settings, needed: int = 0, what: str = "") -> str | None:
    """Why a worker must not go on (the disk, and the setting), or None while there is room
    for ``needed`` more bytes (``what``) above the floor."""
    free = free_bytes(settings)
    floor = settings.min_free_disk_mb * MiB
    if free - needed >= floor:
        return None
    room = f"{what} need about {_mb(needed)} MB, and " if needed else ""
    return (
        f"the worker's disk is full: {room}{free // MiB} MB are free under its GRAFT_DATA_DIR, "
        f"and it keeps {settings.min_free_disk_mb} MB free (GRAFT_MIN_FREE_DISK_MB). Free "
        "space on the worker, then submit the job again"
    )


def _mb(n: int) -> int:
    return -(-n // MiB)
