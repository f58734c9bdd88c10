"""Temporary folders (and files) under the data folder that say whether someone is still
writing them.

Whoever makes one holds an exclusive ``flock`` on the folder itself for as long as it works
there; the kernel lets go when the process ends, however it ends. The janitor removes a folder
only when it can take that lock (no live process holds it) and the folder is older than the
grace period: a slow writer, however deep its writes go, is never cleaned up under its feet,
and a killed one's folder goes at the next pass after the grace.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def hold(path: Path) -> int:
    """Lock ``path`` (a folder or a file) for this process; the descriptor to close when done
    with it."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextmanager
def scratch(root: Path, prefix: str = "tmp-") -> Iterator[Path]:
    """A new folder in ``root``, held while the block runs, then removed."""
    folder = Path(tempfile.mkdtemp(dir=root, prefix=prefix))
    fd = hold(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def in_use(path: Path) -> bool:
    """Whether a live process holds ``path`` (see :func:`hold`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the lock if it was taken
    return False
