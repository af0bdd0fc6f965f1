"""pipeline.cluster: what fits and works on a cluster, decided before any work; one Ray connection."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline import cluster
from pipeline.cluster import (
    DATA_HINT,
    LOOPBACK_HINT,
    STORAGE_HINT,
    NodeChecks,
    check_tracking_reachable,
    nodes_message,
    probe_node,
)
from pipeline.config import ConfigError
from tests.conftest import free_port


def test_a_file_store_is_refused_only_with_more_than_one_node() -> None:
    for uri in ("sqlite:////work/mlflow.db", "file:///work/mlruns", "/work/mlruns"):
        with pytest.raises(ConfigError, match="has 2 nodes and ranks on the others cannot reach it"):
            check_tracking_reachable(uri, 2, "the Ray cluster at RAY_ADDRESS=10.0.0.1:6379")
        check_tracking_reachable(uri, 1, "a local Ray cluster")
    check_tracking_reachable("http://10.0.0.1:5000", 3, "the Ray cluster")


@pytest.mark.slow  # a local Ray cluster: ~10-30 s to start and stop on 2 cores
def test_a_taken_dashboard_port_is_retried_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.delenv(cluster.ADDRESS_ENV, raising=False)
    picked: list[int] = []
    fresh_port = cluster.free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def port_picker() -> int:
            picked.append(int(taken.getsockname()[1]) if not picked else fresh_port())
            return picked[-1]

        monkeypatch.setattr(cluster, "free_port", port_picker)
        with cluster.connected(log_to_driver=False) as where:
            assert where == "a local Ray cluster"
            assert len(picked) == 2, picked
            assert ray.get_runtime_context().get_node_id()
            dashboard = ray._private.worker.get_dashboard_url()
            assert dashboard.endswith(f":{picked[1]}"), (dashboard, picked)
            # The failed attempt's half-started head (its GCS server) was stopped, not left behind.
            names = [child.name() for child in psutil.Process().children(recursive=True)]
            assert names.count("gcs_server") == 1, names


def test_nodes_message_names_each_node_and_what_it_could_not_reach() -> None:
    message = nodes_message(
        "the Ray cluster at RAY_ADDRESS=10.0.0.1:6379",
        3,
        [
            ("10.0.0.2", ["cannot read /d/categories.json: No such file or directory (hint)"]),
            ("10.0.0.3", ["cannot see /s/.preflight-1 (hint)", "cannot reach the MLflow tracking server x"]),
        ],
    )
    assert message == (
        "not every node of the Ray cluster at RAY_ADDRESS=10.0.0.1:6379 reaches what the run needs "
        "(checked from each of its 3 nodes): "
        "node 10.0.0.2: cannot read /d/categories.json: No such file or directory (hint); "
        "node 10.0.0.3: cannot see /s/.preflight-1 (hint); "
        "node 10.0.0.3: cannot reach the MLflow tracking server x"
    )
    assert "\n" not in message  # one line on stderr


def test_probe_node_says_what_this_machine_cannot_reach(tmp_path: Path) -> None:
    """What a node's task does, run here: each missing thing named with why it matters."""
    (tmp_path / "categories.json").write_text("[]")
    storage = tmp_path / "runs"
    storage.mkdir()
    probe = storage / ".preflight-abc"
    port = free_port()  # nothing listens there
    checks = NodeChecks(
        files=(
            (str(tmp_path / "categories.json"), DATA_HINT),
            (str(tmp_path / "train" / "split.json"), DATA_HINT),
        ),
        storage=str(storage),
        probe=str(probe),
        tracking_uri=f"http://127.0.0.1:{port}",
        timeout_s=5.0,
    )
    problems = probe_node(checks)
    assert problems == [
        f"cannot read {tmp_path / 'train' / 'split.json'}: No such file or directory ({DATA_HINT})",
        f"cannot see {probe}, which the driver wrote into the storage path ({STORAGE_HINT})",
        f"cannot reach the MLflow tracking server http://127.0.0.1:{port}: [Errno 111] Connection refused "
        f"({LOOPBACK_HINT})",
    ]

    probe.write_bytes(b"")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "split.json").write_text("{}")
    with _health_server() as uri:
        assert probe_node(dataclasses.replace(checks, tracking_uri=uri)) == []
    assert sorted(p.name for p in storage.iterdir()) == [probe.name], "the node's own write test is removed"


@contextlib.contextmanager
def _health_server() -> Iterator[str]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
