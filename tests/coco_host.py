"""A real HTTP server on 127.0.0.1 that serves files as images.cocodataset.org does, for tests.

* `serve(root)`: a threaded `http.server` over ``root`` in a background thread, answering
  GET with ``Range: bytes=a-`` / ``a-b`` (206 + ``Content-Range``; 416 past the end). Options
  inject faults: ``drop_first`` cuts the first response for a path after N bytes (the
  connection closes mid-file), ``ignore_range`` answers every request with the whole file,
  ``error_page_first`` answers the first N requests for a path with 200 and `ERROR_PAGE` (an
  HTML page under the file's name, as a mirror's outage or login page comes).
  ``server.requests`` records ``(path, Range header)`` of each request.
* `lay_out_like_cocodataset(coco_mini, root)`: zips the shared coco-mini sample the way
  cocodataset.org ships COCO (``annotations/annotations_trainval2017.zip`` holding
  ``annotations/instances_*.json``, ``zips/<split>.zip`` holding ``<split>/*.jpg``) and puts
  loose images at ``<split>/<file_name>`` (symlinks to the shared files, read-only).
"""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SPLITS = ("train2017", "val2017")
ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service unavailable</title></head>\n"
    b"<body><h1>Our mirror is down for maintenance</h1></body></html>\n"
)


@dataclass
class Host:
    """A running server: its base URL and what it saw."""

    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)


@contextlib.contextmanager
def serve(
    root: Path,
    *,
    drop_first: dict[str, int] | None = None,
    ignore_range: bool = False,
    error_page_first: dict[str, int] | None = None,
) -> Iterator[Host]:
    """Serve ``root`` on 127.0.0.1 (a free port) until the block ends."""
    drops = dict(drop_first or {})
    error_pages = dict(error_page_first or {})
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            rel = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
            range_header = self.headers.get("Range")
            host.requests.append((rel, range_header))
            with lock:
                pages_left = error_pages.get(rel, 0)
                error_pages[rel] = pages_left - 1
            if pages_left > 0:
                self._send_body(ERROR_PAGE, "text/html; charset=utf-8")
                return
            file = root / rel
            if ".." in rel.split("/") or not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            size = len(body)
            start, end = 0, size - 1
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match and not ignore_range:
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            with lock:
                cut = drops.pop(rel, None)
            if cut is not None:  # send part of the body, then drop the connection
                self.wfile.write(body[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body[start : end + 1])

        def _send_body(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host = Host(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def lay_out_like_cocodataset(coco_mini: Path, root: Path) -> Path:
    """Build images.cocodataset.org's layout of ``coco_mini`` under ``root``; return ``root``."""
    (root / "annotations").mkdir(parents=True)
    (root / "zips").mkdir()
    with zipfile.ZipFile(
        root / "annotations" / "annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED
    ) as zf:
        for split in SPLITS:
            zf.write(
                coco_mini / "annotations" / f"instances_{split}.json", f"annotations/instances_{split}.json"
            )
    for split in SPLITS:
        (root / split).mkdir()
        with zipfile.ZipFile(root / "zips" / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{split}/", b"")  # cocodataset.org's zips list the folder too
            for image in sorted((coco_mini / split).glob("*.jpg")):
                zf.write(image, f"{split}/{image.name}")
                (root / split / image.name).symlink_to(image)
    return root
