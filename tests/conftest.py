"""Session-wide test setup shared by every test package.

* The virtualenv's `bin/` goes first on PATH, so subprocesses (`ray`, `mlflow`, `dvc`,
  `python -m stages...`) use the same environment as pytest, activated or not.
* `shared_data` gives `../shared/data` (real COCO samples) or skips with the reason.
* `mlflow_server` and `s3_server`: a real MLflow tracking server and a real S3 server
  (``moto_server``, tests/s3_server.py) on 127.0.0.1, one per session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root (where params.yaml and dvc.yaml live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout, or skip: a user's fresh clone has no shared/."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real COCO samples not found at {SHARED_DATA} (../shared/data is absent)")
    return SHARED_DATA


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, *, artifacts: str | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite in ``root``; artifacts proxied to ``artifacts``,
    a folder or ``s3://...``, default ``root/artifacts``) for a block; yields its URI.

    ``env``: extra environment of the server (the AWS variables of an S3 artifact store).
    ~12 s until /health answers; stopped by its process group at the end.
    """
    import subprocess
    import time
    import urllib.request

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("wb")
    command = [
        "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", artifacts or str(root / "artifacts"),
    ]  # fmt: skip
    server = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: see {root / 'server.log'}")
            time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)  # the server's own process group (it runs uvicorn workers)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts), once per session; yields its URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (``moto_server``) on 127.0.0.1 with a bucket; yields a `tests.s3_server.S3Server`.

    Its ``env`` (endpoint, test credentials, region) is what clients need: pass it to subprocesses,
    or ``monkeypatch.setenv`` it. Skips when moto[server] is not installed.
    """
    from tests.s3_server import moto_server_command, start_s3_server

    if moto_server_command() is None:
        pytest.skip('moto[server] is not installed (pip install -e ".[dev]"): no S3 server to test against')
    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    try:
        yield server
    finally:
        server.stop()
