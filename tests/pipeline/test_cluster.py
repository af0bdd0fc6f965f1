"""pipeline.cluster: what fits and works on a cluster, decided before any work; one Ray connection."""

from __future__ import annotations

import socket

import psutil
import pytest

from pipeline import cluster
from pipeline.cluster import check_tracking_reachable
from pipeline.config import ConfigError


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
    fresh_port = cluster._free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def port_picker() -> int:
            picked.append(int(taken.getsockname()[1]) if not picked else fresh_port())
            return picked[-1]

        monkeypatch.setattr(cluster, "_free_port", port_picker)
        with cluster.connected(log_to_driver=False) as where:
            assert where == "a local Ray cluster"
            assert len(picked) == 2, picked
            assert ray.get_runtime_context().get_node_id()
            dashboard = ray._private.worker.get_dashboard_url()
            assert dashboard.endswith(f":{picked[1]}"), (dashboard, picked)
            # The failed attempt's half-started head (its GCS server) was stopped, not left behind.
            names = [child.name() for child in psutil.Process().children(recursive=True)]
            assert names.count("gcs_server") == 1, names
