"""pipeline.tracking.server: a real ``mlflow server`` over SQLite, started again on another port when
its first one turns out to be taken, and never mistaken for whatever else answers on that port."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.tracking import server
from pipeline.tracking.run import mlflow_client


class _Healthy(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 OK, like an MLflow server's /health."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port on 127.0.0.1 bound and listening, where nothing ever answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def impostor() -> Iterator[int]:
    """A port on 127.0.0.1 where another HTTP server answers /health with 200."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow  # two mlflow server starts at ~12 s each on an idle machine
@pytest.mark.parametrize("occupant", [silent_listener, impostor], ids=["silent-listener", "impostor"])
def test_a_taken_first_port_is_retried_on_another_and_the_server_is_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, occupant: contextlib.AbstractContextManager
) -> None:
    picked: list[int] = []
    fresh_port = server.free_port

    with occupant() as taken:  # type: ignore[operator]

        def port_picker() -> int:
            picked.append(taken if not picked else fresh_port())
            return picked[-1]

        monkeypatch.setattr(server, "free_port", port_picker)
        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        with server.serve_sqlite(store, artifact_root=tmp_path / "mlruns") as served:
            assert picked[0] == taken and len(picked) == 2, picked
            assert served == f"http://127.0.0.1:{picked[1]}"
            client = mlflow_client(served)
            run = client.create_run(client.create_experiment("through-the-server"))

    # What the served URI wrote is in our SQLite store: it was our server that answered.
    assert mlflow_client(store).get_run(run.info.run_id).info.run_id == run.info.run_id
