"""pipeline.cluster: what fits and what works on a cluster, decided before any work."""

from __future__ import annotations

import pytest

from pipeline.cluster import check_tracking_reachable
from pipeline.config import ConfigError


def test_a_file_store_is_refused_only_with_more_than_one_node() -> None:
    for uri in ("sqlite:////work/mlflow.db", "file:///work/mlruns", "/work/mlruns"):
        with pytest.raises(ConfigError, match="has 2 nodes and ranks on the others cannot reach it"):
            check_tracking_reachable(uri, 2, "the Ray cluster at RAY_ADDRESS=10.0.0.1:6379")
        check_tracking_reachable(uri, 1, "a local Ray cluster")
    check_tracking_reachable("http://10.0.0.1:5000", 3, "the Ray cluster")
