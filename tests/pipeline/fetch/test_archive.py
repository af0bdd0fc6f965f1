"""pipeline.fetch.archive: hostile entries are refused before anything is written; corruption is named."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from pipeline.fetch.archive import ArchiveError, UnsafeArchiveError, extract_zip


def make_zip(path: Path, entries: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_extracts_selected_members(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "a.zip", {"val2017/1.jpg": b"one", "val2017/2.jpg": b"two", "other/3.txt": b"x"}
    )
    written = extract_zip(
        archive, tmp_path / "out", select=lambda n: n.startswith("val2017/"), progress=False
    )
    assert written == 2
    assert (tmp_path / "out" / "val2017" / "2.jpg").read_bytes() == b"two"
    assert not (tmp_path / "out" / "other").exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", r"'\.\.' in path"),
        ("val2017/../../evil.txt", r"'\.\.' in path"),
        ("/tmp/evil.txt", "absolute"),
    ],
)
def test_path_traversal_is_refused(tmp_path: Path, name: str, reason: str) -> None:
    archive = make_zip(tmp_path / "bad.zip", {"ok.txt": b"fine", name: b"owned"})
    with pytest.raises(UnsafeArchiveError, match=rf"bad\.zip: refusing to extract entry .*: {reason}"):
        extract_zip(archive, tmp_path / "out" / "deep", progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything was written
    assert not (tmp_path / "evil.txt").exists()


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "link.zip", {"ok.txt": b"fine"}, symlink="val2017/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(archive, tmp_path / "out", progress=False)


def test_not_a_zip_and_bad_crc_are_named(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"<html>not found</html>")
    with pytest.raises(ArchiveError, match=r"junk\.zip: not a readable zip"):
        extract_zip(tmp_path / "junk.zip", tmp_path / "out", progress=False)

    payload = b"A" * 10_000
    with zipfile.ZipFile(tmp_path / "crc.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.bin", payload)
    raw = bytearray((tmp_path / "crc.zip").read_bytes())
    at = raw.find(payload)
    raw[at + 5000] ^= 0xFF  # flip one stored byte: the CRC-32 no longer matches
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match=r"crc\.zip: member 'data\.bin' is corrupt"):
        extract_zip(tmp_path / "crc.zip", tmp_path / "out", progress=False)
