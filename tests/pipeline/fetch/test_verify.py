"""pipeline.fetch.verify: what a file's name promises, checked on real zips, images and error pages."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.fetch.verify import content_problem, start_problem
from tests.coco_host import ERROR_PAGE


@pytest.fixture
def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"val2017/{i}.jpg", os.urandom(10_000))
    return buffer.getvalue()


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    return buffer.getvalue()


def problem(tmp_path: Path, name: str, data: bytes) -> str | None:
    (tmp_path / name).write_bytes(data)
    return content_problem(tmp_path / name)


def test_whole_files_pass(tmp_path: Path, zip_bytes: bytes) -> None:
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    assert problem(tmp_path, "a.zip", zip_bytes) is None
    assert problem(tmp_path, "empty.zip", empty.getvalue()) is None
    assert problem(tmp_path, "stub.zip", b"MZ-stub" + zip_bytes) is None  # a zip may follow other bytes
    assert problem(tmp_path, "a.jpg", image_bytes("JPEG")) is None
    assert problem(tmp_path, "b.jpg", image_bytes("PNG")) is None  # a mislabelled image is still an image
    assert problem(tmp_path, "notes.txt", ERROR_PAGE) is None  # names that promise nothing are not checked


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("a.zip", lambda z: ERROR_PAGE, "starts with '<!DOCTYPE html' -- an HTML page, not a zip"),
        ("a.zip", lambda z: b"", "is empty, not a zip"),
        ("a.zip", lambda z: z[: len(z) // 2], "is not a readable zip"),  # the directory is lost
        ("a.zip", lambda z: z[:12_000] + z[12_100:], "is damaged or cut short: member 'val2017/0.jpg'"),
        ("a.zip", lambda z: z[:12_000] + b"x" * 500 + z[12_000:], "is damaged: no local header"),
        ("a.jpg", lambda z: b'<?xml version="1.0"?><Error/>', "an XML document, not a JPEG or PNG image"),
        ("a.png", lambda z: b"\x00\x01\x02", r"starts with '\x00\x01\x02', not a JPEG or PNG image"),
    ],
)
def test_damaged_files_are_described(
    tmp_path: Path, zip_bytes: bytes, name: str, damage, expected: str
) -> None:
    found = problem(tmp_path, name, damage(zip_bytes))
    assert found is not None and expected in found


def test_start_problem_judges_only_what_it_can_see() -> None:
    assert (
        start_problem("a.zip", ERROR_PAGE[:64]) == "starts with '<!DOCTYPE html' -- an HTML page, not a zip"
    )
    assert start_problem("a.zip", b"PK\x03\x04" + b"\x00" * 60) is None
    assert start_problem("a.zip", b"<!") is None  # too short to tell
    assert start_problem("a.bin", ERROR_PAGE) is None
