"""A stored dataset unpacks the same on every Python a worker may run, with or without tarfile's
extraction filters (Python 3.11.4 on; Debian bookworm's python3 is 3.11.2), and an archive with
an entry that would land outside the job's folder is refused either way."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest

from devkit import digits as D
from engine.errors import EngineError
from worker.spec import unpack_dataset_tar


def packed(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("filters", [True, False])
def test_a_stored_dataset_unpacks_the_same_with_or_without_filters(tmp_path, digit_splits, filters):
    _, held = digit_splits
    entries = {
        f"{d}/{i}.png": D.png_bytes(im) for d in (3, 9) for i, im in enumerate(held.of(d)[:4])
    }
    with tarfile.open(fileobj=packed(entries)) as tar:
        unpack_dataset_tar(tar, tmp_path / "images", filters=filters)
    found = {
        str(p.relative_to(tmp_path / "images")): p.read_bytes()
        for p in (tmp_path / "images").rglob("*.png")
    }
    assert found == entries


@pytest.mark.parametrize("filters", [True, False])
def test_an_entry_that_climbs_out_of_the_folder_is_refused(tmp_path, filters):
    with (
        tarfile.open(fileobj=packed({"../escaped.png": b"x"})) as tar,
        pytest.raises((EngineError, tarfile.FilterError)),
    ):
        unpack_dataset_tar(tar, tmp_path / "images", filters=filters)
    assert not (tmp_path / "escaped.png").exists()


@pytest.mark.parametrize("filters", [True, False])
def test_an_absolute_entry_never_lands_outside_the_folder(tmp_path, filters):
    target = tmp_path / "images"
    name = str(tmp_path / "escaped.png")
    # refused without filters; the filters strip the leading "/" instead
    with tarfile.open(fileobj=packed({name: b"x"})) as tar, contextlib.suppress(EngineError):
        unpack_dataset_tar(tar, target, filters=filters)
    assert not Path(name).exists()


def test_a_link_is_refused_without_filters(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("3/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as tar, pytest.raises(EngineError, match="unsafe"):
        unpack_dataset_tar(tar, tmp_path / "images", filters=False)
    assert not (tmp_path / "images" / "3" / "link.png").exists()
