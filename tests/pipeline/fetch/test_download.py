"""pipeline.fetch.download against a real HTTP server on 127.0.0.1: resume, verification, failures."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.fetch.download import DownloadError, Expected, UnreachableError, download_file, download_many
from tests.coco_host import ERROR_PAGE, serve
from tests.conftest import free_port

SIZE = 300_000


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    (root / "files" / "blob.bin").write_bytes(os.urandom(SIZE))
    for i in range(5):
        (root / "files" / f"small{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    with zipfile.ZipFile(root / "files" / "pack.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"pack/{i}.bin", os.urandom(50_000))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, format="JPEG")
    (root / "files" / "photo.jpg").write_bytes(buffer.getvalue())
    return root


def test_whole_download_verified(served: Path, tmp_path: Path) -> None:
    blob = (served / "files" / "blob.bin").read_bytes()
    with serve(served) as host:
        dest = download_file(
            f"{host.url}/files/blob.bin", tmp_path / "out" / "blob.bin",
            expected=Expected(SIZE, hashlib.md5(blob).hexdigest()), progress=False,
        )  # fmt: skip
    assert dest.read_bytes() == blob
    assert not dest.with_name("blob.bin.part").exists()


def test_dropped_connection_resumes_with_range(served: Path, tmp_path: Path) -> None:
    blob = (served / "files" / "blob.bin").read_bytes()
    with serve(served, drop_first={"files/blob.bin": 100_000}) as host:
        dest = download_file(
            f"{host.url}/files/blob.bin", tmp_path / "blob.bin",
            expected=Expected(SIZE, hashlib.md5(blob).hexdigest()), retries=2, progress=False,
        )  # fmt: skip
    assert dest.read_bytes() == blob
    assert host.requests == [("files/blob.bin", None), ("files/blob.bin", "bytes=100000-")]


def test_part_file_from_an_earlier_run_is_resumed(served: Path, tmp_path: Path) -> None:
    blob = (served / "files" / "blob.bin").read_bytes()
    (tmp_path / "blob.bin.part").write_bytes(blob[:123_456])
    with serve(served) as host:
        dest = download_file(
            f"{host.url}/files/blob.bin", tmp_path / "blob.bin",
            expected=Expected(md5=hashlib.md5(blob).hexdigest()), progress=False,
        )  # fmt: skip
    assert dest.read_bytes() == blob
    assert host.requests == [("files/blob.bin", "bytes=123456-")]


def test_server_without_range_support_restarts(served: Path, tmp_path: Path) -> None:
    blob = (served / "files" / "blob.bin").read_bytes()
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)  # wrong bytes: must be overwritten, not appended
    with serve(served, ignore_range=True) as host:
        dest = download_file(f"{host.url}/files/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == blob


def test_complete_part_file_answered_416_is_kept(served: Path, tmp_path: Path) -> None:
    blob = (served / "files" / "blob.bin").read_bytes()
    (tmp_path / "blob.bin.part").write_bytes(blob)
    with serve(served) as host:
        dest = download_file(f"{host.url}/files/blob.bin", tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == blob
    assert host.requests == [("files/blob.bin", f"bytes={SIZE}-")]


def test_checksum_mismatch_fails_and_removes_the_part(served: Path, tmp_path: Path) -> None:
    with serve(served) as host, pytest.raises(DownloadError, match="MD5 .* does not match"):
        download_file(
            f"{host.url}/files/blob.bin", tmp_path / "b.bin", expected=Expected(md5="0" * 32), progress=False
        )
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()


def test_size_mismatch_fails_before_downloading(served: Path, tmp_path: Path) -> None:
    with serve(served) as host, pytest.raises(DownloadError, match="offers 300000 bytes, expected 12"):
        download_file(
            f"{host.url}/files/blob.bin", tmp_path / "b.bin", expected=Expected(size=12), progress=False
        )
    assert not (tmp_path / "b.bin").exists()


def test_404_is_not_retried(served: Path, tmp_path: Path) -> None:
    with serve(served) as host, pytest.raises(DownloadError, match=r"files/absent\.bin: HTTP 404"):
        download_file(f"{host.url}/files/absent.bin", tmp_path / "a.bin", retries=3, progress=False)
    assert len(host.requests) == 1


def test_unreachable_host_fails_at_once(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/x.zip"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UnreachableError, match=f"cannot reach {url}"):
        download_file(url, tmp_path / "x.zip", retries=5, progress=False)
    assert time.monotonic() - start < 2.0  # no retries with backoff


def test_download_many_collects_failures_and_keeps_the_rest(served: Path, tmp_path: Path) -> None:
    with serve(served) as host:
        jobs = [(f"{host.url}/files/small{i}.bin", tmp_path / f"small{i}.bin") for i in range(5)]
        jobs.append((f"{host.url}/files/absent.bin", tmp_path / "absent.bin"))
        with pytest.raises(DownloadError, match=r"1 of 6 downloads failed:\n.*absent\.bin: HTTP 404"):
            download_many(jobs, workers=3, progress=False)
        assert all((tmp_path / f"small{i}.bin").read_bytes() == bytes([i]) * (1000 + i) for i in range(5))
        seen = len(host.requests)
        download_many(jobs[:5], workers=3, progress=False)  # a re-run skips what is already whole
        assert len(host.requests) == seen


def test_an_error_page_served_once_is_downloaded_again(
    served: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(served, error_page_first={"files/pack.zip": 1}) as host, caplog.at_level(logging.WARNING):
        dest = download_file(f"{host.url}/files/pack.zip", tmp_path / "pack.zip", progress=False)
    assert dest.read_bytes() == (served / "files" / "pack.zip").read_bytes()
    assert host.requests == [("files/pack.zip", None)] * 2
    assert "starts with '<!DOCTYPE html' -- an HTML page, not a zip; downloading it again" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack.zip", "www"]  # no .part, no .rejected


@pytest.mark.parametrize(
    ("name", "cached", "problem"),
    [
        ("photo.jpg", ERROR_PAGE, "an HTML page, not a JPEG or PNG image"),
        ("pack.zip", b"", "is empty, not a zip"),
        ("pack.zip", None, "not a readable zip"),  # None: the real zip cut short
    ],
)
def test_a_bad_cached_file_is_replaced(
    served: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    cached: bytes | None,
    problem: str,
) -> None:
    whole = (served / "files" / name).read_bytes()
    (tmp_path / name).write_bytes(whole[: len(whole) // 2] if cached is None else cached)
    with serve(served) as host, caplog.at_level(logging.WARNING):
        dest = download_file(f"{host.url}/files/{name}", tmp_path / name, progress=False)
    assert dest.read_bytes() == whole
    assert host.requests == [(f"files/{name}", None)]
    assert f"{tmp_path / name}: " in caplog.text and problem in caplog.text


def test_a_whole_cached_file_is_not_fetched_again(served: Path, tmp_path: Path) -> None:
    for name in ("pack.zip", "photo.jpg"):
        (tmp_path / name).write_bytes((served / "files" / name).read_bytes())
    with serve(served) as host:
        download_many(
            [(f"{host.url}/files/{name}", tmp_path / name) for name in ("pack.zip", "photo.jpg")],
            progress=False,
        )
    assert host.requests == []


def test_a_part_file_that_cannot_start_the_file_is_not_resumed(served: Path, tmp_path: Path) -> None:
    (tmp_path / "pack.zip.part").write_bytes(ERROR_PAGE)  # resuming would append the zip's tail to a page
    with serve(served) as host:
        dest = download_file(f"{host.url}/files/pack.zip", tmp_path / "pack.zip", progress=False)
    assert dest.read_bytes() == (served / "files" / "pack.zip").read_bytes()
    assert host.requests == [("files/pack.zip", None)]


def test_an_error_page_twice_fails_naming_the_url_and_the_copy(served: Path, tmp_path: Path) -> None:
    (served / "files" / "photo.jpg").write_bytes(ERROR_PAGE)
    with serve(served) as host, pytest.raises(DownloadError) as failure:
        download_many([(f"{host.url}/files/photo.jpg", tmp_path / "photo.jpg")], retries=0, progress=False)
    message = str(failure.value)
    assert (
        f"{host.url}/files/photo.jpg: the copy downloaded to {tmp_path / 'photo.jpg'} starts with" in message
    )
    assert "'<!DOCTYPE html' -- an HTML page, not a JPEG or PNG image" in message
    assert f"kept as {tmp_path / 'photo.jpg.rejected'}" in message
    assert (tmp_path / "photo.jpg.rejected").read_bytes() == ERROR_PAGE
    assert not (tmp_path / "photo.jpg").exists() and not (tmp_path / "photo.jpg.part").exists()
    assert len(host.requests) == 2
