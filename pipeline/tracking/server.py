"""One MLflow tracking server in front of a SQLite store, for runs that write side by side.

SQLite behind several writers (variants or trials training at once, each rank 0 logging
metrics) answers "database is locked" now and then, and `pipeline.tracking.run.TrackedRun` turns a
run's logging off at the first failure. `serve_sqlite(uri)` starts ``mlflow server`` on
127.0.0.1 over that database, points ``MLFLOW_TRACKING_URI`` at it for the duration (a
training job reads it when it starts and hands it to its Ray workers), and stops the server by
its PID at the end.

The port is one the kernel had free a moment before, so another process may take it before the
server binds it. A start is retried on a new port, up to `START_ATTEMPTS` times, when the server
exits saying "address already in use", or when ``/health`` answers on the port but the listening
socket there is not held by the server's own processes (someone else answered). A server counts
as started only when ``/health`` answers and its own process tree listens on the port.

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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from pipeline.ports import free_port
from pipeline.tracking.run import TRACKING_URI_ENV
from pipeline.tracking.store import prepare_store

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # about 12 s on an idle 2-core machine; much more under load
START_ATTEMPTS = 3  # ports tried before giving up when each turns out to be taken
ADDRESS_IN_USE = "address already in use"  # what uvicorn logs when it cannot bind (errno 98)


class PortTaken(RuntimeError):
    """The server's port was taken by another process before the server could bind it."""


@dataclass
class _Server:
    """A started ``mlflow server`` process: its port and its log file (stdout and stderr)."""

    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]


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


def _launch(uri: str, root: Path, port: int) -> _Server:
    """Start ``mlflow server`` over ``uri`` on 127.0.0.1:``port`` in its own session, logging to a file."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", uri, "--default-artifact-root", str(root.resolve()),
        "--no-serve-artifacts",
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False) as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    return _Server(process, port, Path(log_file.name))


def _health_answers(uri: str) -> bool:
    """True when ``<uri>/health`` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _listens(process: subprocess.Popen, port: int) -> bool:
    """True when ``process`` or one of its descendants holds the listening TCP socket on ``port``.

    A process tree that cannot be inspected (gone meanwhile, or access denied) counts as alive and
    listening when its root is still running: the check then falls back to "our process is alive".
    """
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in tree:
        try:
            connections = member.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            return process.poll() is None
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections):
            return process.poll() is None
    return False


def _wait_serving(server: _Server, uri: str, deadline: float) -> None:
    """Return once ``server`` answers ``/health`` from its own processes.

    Raises `PortTaken` when its port belongs to another process (it exited with "address already
    in use", or someone else answers there), `RuntimeError` when it died otherwise or did not
    answer by ``deadline`` (``time.monotonic()``).
    """
    while True:
        if _health_answers(server.uri):
            if _listens(server.process, server.port):
                return
            raise PortTaken(
                f"127.0.0.1:{server.port} answers /health, but not from the mlflow server started there"
            )
        if server.process.poll() is not None:
            tail = server.log_tail()
            if ADDRESS_IN_USE in tail.lower():
                raise PortTaken(f"127.0.0.1:{server.port}: {ADDRESS_IN_USE}")
            raise RuntimeError(f"mlflow server for {uri} exited (log {server.log_path}):\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"mlflow server for {uri} did not answer in {START_TIMEOUT_S:.0f} s (log {server.log_path}):\n"
                f"{server.log_tail()}"
            )
        time.sleep(0.5)


def _discard(server: _Server) -> None:
    """Stop ``server`` and delete its log."""
    _stop(server.process)
    server.log_path.unlink(missing_ok=True)


def _start(uri: str, root: Path) -> _Server:
    """A started server over ``uri``; a port taken meanwhile is replaced by a new one (`START_ATTEMPTS`)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    clashes: list[str] = []
    for _ in range(START_ATTEMPTS):
        server = _launch(uri, root, free_port())
        try:
            _wait_serving(server, uri, deadline)
        except PortTaken as err:
            log.warning("mlflow server for %s: %s; starting it again on another port", uri, err)
            clashes.append(str(err))
            _discard(server)
            continue
        except BaseException:
            _discard(server)
            raise
        return server
    raise RuntimeError(f"mlflow server for {uri}: every port tried was taken ({'; '.join(clashes)})")


@contextlib.contextmanager
def serve_sqlite(uri: str, *, artifact_root: str | Path | None = None) -> Iterator[str]:
    """Yield an ``http://127.0.0.1:<port>`` URI serving the SQLite store ``uri`` (others: ``uri`` itself).

    ``artifact_root`` is where new experiments keep artifacts (default ``<cwd>/mlruns``, what
    MLflow uses for a SQLite store without a server). ``MLFLOW_TRACKING_URI`` is set to the
    server while inside the block and restored afterwards. The store is created and migrated
    first (`pipeline.tracking.store.prepare_store`); a port taken meanwhile is retried (module
    docstring). A server that does not start raises `RuntimeError` with the end of its log.
    """
    if not uri.startswith("sqlite:"):
        yield uri
        return
    prepare_store(uri)
    root = Path(artifact_root) if artifact_root is not None else Path.cwd() / "mlruns"
    server = _start(uri, root)
    previous = os.environ.get(TRACKING_URI_ENV)
    try:
        log.info(
            "MLflow server %s over %s (pid %d, log %s)", server.uri, uri, server.process.pid, server.log_path
        )
        os.environ[TRACKING_URI_ENV] = server.uri
        yield server.uri
    finally:
        if previous is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous
        _discard(server)
