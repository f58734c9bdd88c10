"""Archive handling on real archives: what is kept, what is reported, what is refused whole."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
from PIL import Image

from app.archives import ArchiveLimits, extract_images
from core.errors import Invalid


def png(size: tuple[int, int] = (8, 8), color: int = 128) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (color, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(out, format="JPEG")
    return out.getvalue()


def make_zip(members: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    buffer.seek(0)
    return buffer


def make_tar(add, mode: str = "w") -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        add(tf)
    buffer.seek(0)
    return buffer


def add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def extract(archive: io.BytesIO, tmp_path, **limits):
    return extract_images(archive, len(archive.getvalue()), ArchiveLimits(**limits), tmp_path)


def test_imagefolder_zip_gives_labels_and_counts(tmp_path):
    result = extract(
        make_zip({"cat/a.png": png(), "cat/b.jpg": jpeg(), "dog/x/y.png": png(color=7)}), tmp_path
    )
    assert result.labels == {"cat": 2, "dog": 1}
    assert result.rejected == []


def test_one_wrapping_folder_is_tolerated(tmp_path):
    result = extract(make_zip({"pets/cat/a.png": png(), "pets/dog/b.png": png(color=7)}), tmp_path)
    assert result.labels == {"cat": 1, "dog": 1}


def test_an_image_counts_once_and_one_under_two_labels_is_left_out_of_both(tmp_path):
    result = extract(
        make_zip(
            {
                "cat/a.png": png(),
                "cat/a-copy.png": png(),
                "cat/b.png": png(color=9),
                "dog/b-again.png": png(color=9),
                "dog/c.png": png(color=11),
            }
        ),
        tmp_path,
    )
    assert result.labels == {"cat": 1, "dog": 1}  # counted after deduplication
    reasons = {r["path"]: r["reason"] for r in result.rejected}
    assert reasons["cat/a-copy.png"] == "the same image as cat/a.png: counted once"
    assert "also under 'dog'" in reasons["cat/b.png"]
    assert "also under 'cat'" in reasons["dog/b-again.png"]


def test_non_images_and_loose_files_are_reported_not_kept(tmp_path):
    truncated = png((64, 64))[:60]
    result = extract(
        make_zip(
            {
                "cat/a.png": png(),
                "cat/notes.txt": b"hello",
                "cat/bad.png": truncated,
                "readme.png": png(),
                "cat/.DS_Store": b"x",
                "__MACOSX/cat/._a.png": b"x",
            }
        ),
        tmp_path,
    )
    assert result.labels == {"cat": 1}
    reasons = {r["path"]: r["reason"] for r in result.rejected}
    assert set(reasons) == {"cat/notes.txt", "cat/bad.png", "readme.png"}
    assert "not inside a label folder" in reasons["readme.png"]


def test_extensions_are_ignored_content_decides(tmp_path):
    result = extract(
        make_zip({"cat/photo.txt": png(), "cat/fake.png": b"GIF89a nonsense"}), tmp_path
    )
    assert result.labels == {"cat": 1}
    assert [r["path"] for r in result.rejected] == ["cat/fake.png"]


def test_unsupported_image_format_is_rejected(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="TIFF")
    result = extract(make_zip({"cat/a.tif": out.getvalue(), "cat/b.png": png()}), tmp_path)
    assert "not an image in an accepted format" in result.rejected[0]["reason"]


def test_tar_gz_is_read(tmp_path):
    archive = make_tar(lambda tf: add_file(tf, "cat/a.png", png()), mode="w:gz")
    assert extract(archive, tmp_path).labels == {"cat": 1}


@pytest.mark.parametrize(
    "name", ["../evil.png", "cat/../../evil.png", "/etc/evil.png", "C:/evil.png", "..\\evil.png"]
)
def test_path_traversal_is_refused_and_nothing_is_written(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Invalid, match="refused"):
        extract(make_zip({"cat/ok.png": png(), name: png()}), out)
    assert not (tmp_path / "evil.png").exists()


def test_symlinks_hardlinks_and_devices_are_refused(tmp_path):
    def with_symlink(tf):
        info = tarfile.TarInfo("cat/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)

    def with_hardlink(tf):
        add_file(tf, "cat/a.png", png())
        info = tarfile.TarInfo("cat/b.png")
        info.type, info.linkname = tarfile.LNKTYPE, "cat/a.png"
        tf.addfile(info)

    def with_device(tf):
        info = tarfile.TarInfo("cat/dev")
        info.type = tarfile.CHRTYPE
        tf.addfile(info)

    for build in (with_symlink, with_hardlink, with_device):
        with pytest.raises(Invalid, match="links and special files"):
            extract(make_tar(build), tmp_path)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        info = zipfile.ZipInfo("cat/link.png")
        info.external_attr = (0o120777) << 16
        zf.writestr(info, "/etc/passwd")
    buffer.seek(0)
    with pytest.raises(Invalid, match="links"):
        extract(buffer, tmp_path)


def test_zip_bomb_is_refused_by_counting_bytes_while_streaming(tmp_path):
    zeros = b"\0" * (4 * 1024 * 1024)
    archive = make_zip({f"cat/{i}.png": zeros for i in range(8)})
    assert len(archive.getvalue()) < 200_000
    with pytest.raises(Invalid, match="compression ratio"):
        extract(archive, tmp_path, max_ratio=50)
    archive.seek(0)
    with pytest.raises(Invalid, match="size limit"):
        extract(archive, tmp_path, max_total_bytes=10 * 1024 * 1024)


def test_oversized_member_is_rejected_even_if_its_header_lies(tmp_path):
    big = png((300, 300), 7) + b"\0" * 100_000

    def lying(tf):
        info = tarfile.TarInfo("cat/big.png")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
        add_file(tf, "cat/ok.png", png())

    result = extract(make_tar(lying), tmp_path, max_member_bytes=50_000)
    assert result.labels == {"cat": 1}
    assert result.rejected[0]["reason"] == "file larger than the per-file limit"


def test_too_many_members_is_refused(tmp_path):
    with pytest.raises(Invalid, match="more than 3 entries"):
        extract(make_zip({f"cat/{i}.png": png() for i in range(5)}), tmp_path, max_members=3)


def test_decompression_bomb_image_is_rejected(tmp_path):
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, format="PNG")  # 144 Mpx in a few kB
    result = extract(
        make_zip({"cat/bomb.png": out.getvalue(), "cat/ok.png": png()}),
        tmp_path,
        max_image_pixels=50_000_000,
    )
    assert result.labels == {"cat": 1}
    assert "pixel" in result.rejected[0]["reason"]


def test_not_an_archive_is_refused(tmp_path):
    with pytest.raises(Invalid, match="zip, .tar or .tar.gz"):
        extract(io.BytesIO(b"just some text"), tmp_path)


def test_folder_names_with_control_characters_are_rejected(tmp_path):
    result = extract(make_zip({"ca\x1bt/a.png": png(), "dog/b.png": png()}), tmp_path)
    assert result.labels == {"dog": 1}
    assert result.rejected == [
        {
            "path": "ca\\x1bt/a.png",
            "reason": "folder names must be printable and at most 200 characters",
        }
    ]
