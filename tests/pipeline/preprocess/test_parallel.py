"""pipeline.preprocess.parallel: results in order on every backend; an unreachable Ray cluster fails at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.cluster import ClusterError
from pipeline.preprocess.parallel import WorkerDied, describe_backend, ordered_map
from tests.conftest import free_port


def square_all(chunk: list[int], offset: int) -> list[int]:
    time.sleep(0.01 * (len(chunk) % 3))  # chunks finish out of order
    return [x * x + offset for x in chunk]


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_order(workers: int) -> None:
    chunks = ([i, i + 1, i + 2][: 1 + i % 3] for i in range(0, 60, 3))  # a lazy generator
    out = list(ordered_map(square_all, chunks, 1, workers=workers))
    expected = [square_all([i, i + 1, i + 2][: 1 + i % 3], 1) for i in range(0, 60, 3)]
    assert out == expected


def killed_on_13(chunk: list[int], offset: int) -> list[int]:
    """`square_all`, except that the worker given 13 is killed (SIGKILL, as the OOM killer does)."""
    if 13 in chunk:
        os.kill(os.getpid(), signal.SIGKILL)
    return square_all(chunk, offset)


def test_a_killed_worker_raises_worker_died_with_the_chunks_in_flight() -> None:
    chunks = [[i, i + 1] for i in range(0, 40, 2)]
    with pytest.raises(WorkerDied) as raised:
        list(ordered_map(killed_on_13, chunks, 0, workers=2))
    assert [12, 13] in raised.value.chunks
    assert (
        all(chunk in chunks for chunk in raised.value.chunks) and len(raised.value.chunks) <= 4
    )  # window 2 x 2


def test_where_it_runs_is_said_and_ray_address_alone_does_not_choose_ray() -> None:
    cluster = {"RAY_ADDRESS": "10.0.0.1:6379"}
    assert describe_backend(True, 0, cluster) == "Ray tasks on the cluster at RAY_ADDRESS=10.0.0.1:6379"
    assert describe_backend(True, 0, {}) == "Ray tasks on a local Ray cluster"
    assert (
        describe_backend(False, 3, cluster)
        == "3 local processes, not on the Ray cluster at RAY_ADDRESS=10.0.0.1:6379"
    )
    assert describe_backend(False, 1, {}) == "in this process"


def test_unreachable_ray_cluster_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    port = free_port()  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}"):
        list(ordered_map(square_all, [[1]], 0, use_ray=True))
    assert time.monotonic() - start < 10
