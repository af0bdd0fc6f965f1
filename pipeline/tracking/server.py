"""One MLflow tracking server in front of a SQLite store, for runs that write side by side.

SQLite behind several writers (variants or trials training at once, each rank 0 logging
metrics) answers "database is locked" now and then, and `pipeline.tracking.run.TrackedRun` turns a
run's logging off at the first failure. `serve_sqlite(uri)` starts ``mlflow server`` on
127.0.0.1 over that database, points ``MLFLOW_TRACKING_URI`` at it for the duration (a
training job reads it when it starts and hands it to its Ray workers), and stops the server by
its PID at the end.

Artifacts are not proxied (``--no-serve-artifacts``): clients write them straight into the
same ``mlruns/`` folder a direct SQLite client uses, so run ids and artifact paths are the same
with or without the server. Other URIs (an ``http://`` server already, a database server) pass
through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.tracking.run import TRACKING_URI_ENV

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # about 12 s on an idle 2-core machine; much more under load


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (uvicorn workers included); SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def serve_sqlite(uri: str, *, artifact_root: str | Path | None = None) -> Iterator[str]:
    """Yield an ``http://127.0.0.1:<port>`` URI serving the SQLite store ``uri`` (others: ``uri`` itself).

    ``artifact_root`` is where new experiments keep artifacts (default ``<cwd>/mlruns``, what
    MLflow uses for a SQLite store without a server). ``MLFLOW_TRACKING_URI`` is set to the
    server while inside the block and restored afterwards.
    """
    if not uri.startswith("sqlite:"):
        yield uri
        return
    root = Path(artifact_root) if artifact_root is not None else Path.cwd() / "mlruns"
    port = _free_port()
    served = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", uri, "--default-artifact-root", str(root.resolve()),
        "--no-serve-artifacts",
    ]  # fmt: skip
    log_file = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    previous = os.environ.get(TRACKING_URI_ENV)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{served}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log_file.name).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server for {uri} did not start (log {log_file.name}):\n{tail}")
            time.sleep(0.5)
        log.info("MLflow server %s over %s (pid %d, log %s)", served, uri, process.pid, log_file.name)
        os.environ[TRACKING_URI_ENV] = served
        yield served
    finally:
        if previous is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous
        _stop(process)
        log_file.close()
        Path(log_file.name).unlink(missing_ok=True)
