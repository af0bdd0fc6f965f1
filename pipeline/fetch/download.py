"""Resumable, verified HTTP downloads with the standard library (urllib).

`download_file(url, dest)` streams into ``dest.part`` and renames it to ``dest`` only when
it is verified. An interrupted download resumes from the ``.part`` file with an HTTP ``Range``
request (a server that ignores ``Range`` answers 200 and the file starts over; a ``.part``
whose first bytes cannot start the file, such as an error page, is not resumed). Checks, in
order: the server's total size against the expected size (before any byte is fetched), the
bytes received against ``Content-Length``; then, on the whole file, its size against the size
the server announced (``Content-Length`` / ``Content-Range`` total), its content against its
name (`pipeline.fetch.verify`: zip structure, image signature), the expected size and MD5.

A host may answer 200 with an error page under the file's name. So a copy that fails a check
-- one downloaded now, or a ``dest`` cached by an earlier run (checked again cheaply: content
and expected size, not the MD5) -- is deleted and downloaded afresh once. If the fresh copy
fails too, it is kept as ``dest.rejected`` to look at and `DownloadError` says what was wrong.

Transient failures (dropped connection, timeout, HTTP 408/429/5xx) are retried with
exponential backoff, resuming each time. A host that cannot be reached at all (connection
refused, unknown host, no route) raises `UnreachableError` at once: retrying an offline
machine only delays the message.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.fetch.verify import HEAD_BYTES, content_problem, start_problem

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
USER_AGENT = "fpn-pipeline/0.1 (python urllib)"
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
REJECTED_SUFFIX = ".rejected"  # a copy that failed verification twice, kept to look at


@dataclass(frozen=True)
class Expected:
    """What a whole file is known to be; ``None`` fields are not checked."""

    size: int | None = None
    md5: str | None = None


class DownloadError(RuntimeError):
    """A download that failed for good; the message names the URL."""


class UnreachableError(DownloadError):
    """The host did not accept a connection at all (offline, wrong address, nothing listening)."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"cannot reach {url} ({reason})")
        self.url = url
        self.reason = reason


class _Transient(Exception):
    """A failure worth retrying (the next attempt resumes from the .part file)."""


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected: Expected | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, return ``dest``.

    An existing ``dest`` is returned when it passes the cheap checks (`_cached_problem`);
    otherwise it is deleted and downloaded again. A downloaded copy that fails verification
    is deleted and downloaded afresh once, unless it already replaces a bad ``dest``. Raises
    `UnreachableError` at once when the host cannot be reached, and `DownloadError` after
    ``retries`` failed retries, when the server offers a size other than the expected one, or
    when the last copy fails verification (kept as ``dest.rejected``; the message names it).
    """
    dest = Path(dest)
    expected = expected or Expected()
    copies = 2
    if dest.is_file():
        problem = _cached_problem(dest, expected)
        if problem is None:
            return dest
        log.warning("%s: %s; downloading it again from %s", dest, problem, url)
        dest.unlink()
        copies = 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, rejected = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + REJECTED_SUFFIX)
    for copy in range(copies):
        problem = _download(url, part, expected, dest.name, timeout_s, retries, progress)
        if problem is None:
            os.replace(part, dest)
            rejected.unlink(missing_ok=True)  # an earlier run's
            return dest
        if copy + 1 < copies:
            log.warning("%s: the copy downloaded to %s %s; downloading it again", url, dest, problem)
            part.unlink()
    os.replace(part, rejected)
    raise DownloadError(
        f"{url}: the copy downloaded to {dest} {problem}, after a bad copy was deleted and downloaded "
        "again. The host does not serve the expected file there: check the URL, or try again later (a "
        f"mirror's outage, login or quota page comes like this). The copy is kept as {rejected} to look "
        f"at; delete it, or the folder {dest.parent}, to clear it (a later run downloads afresh anyway)."
    )


def _cached_problem(dest: Path, expected: Expected) -> str | None:
    """What is wrong with a ``dest`` left by an earlier run: its size if known, its content.

    Not its MD5: that would read the whole file (19 GB for train2017.zip) on every run, and
    this version checked it before the rename; the cheap checks catch what older versions let
    through (an error page renamed into place).
    """
    size = dest.stat().st_size
    if expected.size is not None and size != expected.size:
        return f"has {size} bytes, expected {expected.size}"
    return content_problem(dest)


def _download(
    url: str, part: Path, expected: Expected, name: str, timeout_s: float, retries: int, progress: bool
) -> str | None:
    """Fill ``part`` from ``url`` (resuming it, retrying transient failures); return `_Transfer.problem`."""
    state = _Transfer(url, part, expected, timeout_s, progress, name)
    try:
        for attempt in range(retries + 1):
            try:
                state.run()
                break
            except _Transient as err:
                if attempt == retries:
                    raise DownloadError(f"{url}: failed after {retries + 1} attempts: {err}") from None
                time.sleep(min(0.25 * 2**attempt, 8.0))
    finally:
        state.close()
    return state.problem()


class _Transfer:
    """One file's download state across attempts: the .part file, its MD5 so far, the bar.

    ``name`` is the final file's name (what `pipeline.fetch.verify` judges the content by).
    """

    def __init__(self, url: str, part: Path, expected: Expected, timeout_s: float, progress: bool, name: str):
        self.url, self.part, self.expected, self.timeout_s = url, part, expected, timeout_s
        self.progress, self.name = progress, name
        self.bar: tqdm | None = None
        self.md5: hashlib._Hash | None = None
        self.md5_bytes = 0  # how much of .part the running MD5 covers
        self.total: int | None = None  # the whole file's size, as the server last announced it

    def run(self) -> None:
        have = self._resumable_bytes()
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(self.url, headers=headers), timeout=self.timeout_s
            )
        except urllib.error.HTTPError as err:
            self._http_error(err, have)
            return
        except urllib.error.URLError as err:
            if _is_unreachable(err.reason):
                raise UnreachableError(self.url, err.reason) from None
            raise _Transient(str(err.reason)) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
            raise _Transient(repr(err)) from None
        with response:
            if response.status == 206:
                match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != have:
                    self.part.unlink(missing_ok=True)
                    raise _Transient(
                        f"bad Content-Range {response.headers.get('Content-Range')!r}; restarting"
                    )
                total = None if match.group(3) == "*" else int(match.group(3))
            else:  # 200: the whole file from byte 0 (the server ignored Range, or we asked for all)
                have = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length is not None else None
            self._check_total(total)
            self.total = total
            self._stream(response, have, total)

    def _resumable_bytes(self) -> int:
        """How much of .part to resume from; 0, with .part deleted, when it cannot start the file."""
        if not self.part.exists():
            return 0
        with open(self.part, "rb") as handle:
            head = handle.read(HEAD_BYTES)
        if start_problem(self.name, head) is not None:
            self.part.unlink()
            return 0
        return self.part.stat().st_size

    def _http_error(self, err: urllib.error.HTTPError, have: int) -> None:
        err.close()
        if err.code == 416 and have:  # nothing left to send: .part may already be whole
            match = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == have:
                self.total = have
                return
            self.part.unlink(missing_ok=True)
            raise _Transient("HTTP 416 for a partial file; restarting from byte 0")
        if err.code in (408, 429) or err.code >= 500:
            raise _Transient(f"HTTP {err.code} {err.reason}")
        raise DownloadError(f"{self.url}: HTTP {err.code} {err.reason}")

    def _check_total(self, total: int | None) -> None:
        if total is not None and self.expected.size is not None and total != self.expected.size:
            raise DownloadError(
                f"{self.url}: the server offers {total} bytes, expected {self.expected.size}: not the known file"
            )

    def _stream(self, response: http.client.HTTPResponse, have: int, total: int | None) -> None:
        self._prepare_md5(have)
        if self.bar is None:
            self.bar = tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=self.name, disable=not self.progress, leave=False,
            )  # fmt: skip
        else:
            self.bar.reset(total=total)
            self.bar.update(have)
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        received = 0
        with open(self.part, "ab" if have else "wb") as handle:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
                    raise _Transient(f"connection lost after {have + received} bytes ({err!r})") from None
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                if self.md5 is not None:
                    self.md5.update(chunk)
                    self.md5_bytes += len(chunk)
                self.bar.update(len(chunk))
        if remaining is not None and received < remaining:
            raise _Transient(f"connection closed after {have + received} of {have + remaining} bytes")

    def _prepare_md5(self, have: int) -> None:
        """Make the running MD5 cover exactly the first ``have`` bytes of .part."""
        if self.expected.md5 is None:
            return
        if self.md5 is not None and self.md5_bytes == have:
            return
        self.md5, self.md5_bytes = hashlib.md5(usedforsecurity=False), 0
        if have:
            with open(self.part, "rb") as handle:
                while self.md5_bytes < have and (
                    chunk := handle.read(min(CHUNK_BYTES, have - self.md5_bytes))
                ):
                    self.md5.update(chunk)
                    self.md5_bytes += len(chunk)

    def problem(self) -> str | None:
        """What is wrong with the finished .part, or ``None`` when every check passes.

        The answer completes a sentence about the file (``"has 10 bytes, but ..."``).
        """
        size = self.part.stat().st_size
        if self.total is not None and size != self.total:
            return f"has {size} bytes, but the server announced {self.total}"
        problem = content_problem(self.part, self.name)
        if problem is not None:
            return problem
        if self.expected.size is not None and size != self.expected.size:
            return f"has {size} bytes, expected {self.expected.size}"
        if self.expected.md5 is not None:
            self._prepare_md5(size)
            assert self.md5 is not None
            digest = self.md5.hexdigest()
            if digest != self.expected.md5:
                return f"has MD5 {digest}, which does not match the known {self.expected.md5}"
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_unreachable(reason: object) -> bool:
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def download_many(
    jobs: Sequence[tuple[str, Path]],
    *,
    workers: int = 8,
    timeout_s: float = 30.0,
    retries: int = 3,
    desc: str = "download",
    progress: bool = True,
) -> None:
    """Download many small files (``(url, dest)`` pairs) in parallel threads, one bar for all.

    Each file gets `download_file`'s resume, retries and verification. Files that already
    exist and pass its cheap checks are skipped, so a re-run continues where an interrupted
    one stopped. An
    unreachable host stops everything at once; other failures are collected and raised
    together as one `DownloadError` after the rest finished.
    """
    failures: list[str] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download") as pool,
        tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar,
    ):
        pending: set[Future[Path]] = {
            pool.submit(download_file, url, dest, timeout_s=timeout_s, retries=retries, progress=False)
            for url, dest in jobs
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                err = future.exception()
                if isinstance(err, UnreachableError):
                    for other in pending:
                        other.cancel()
                    raise err
                if isinstance(err, DownloadError):
                    failures.append(str(err))
                elif err is not None:
                    raise err
                bar.update(1)
    if failures:
        shown = "\n  ".join(failures[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise DownloadError(f"{len(failures)} of {len(jobs)} downloads failed:\n  {shown}{more}")
