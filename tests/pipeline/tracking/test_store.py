"""pipeline.tracking.store: a fresh SQLite store opened by several processes at once keeps every run."""

from __future__ import annotations

import multiprocessing
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from pipeline.tracking.run import TrackedRun, mlflow_client

WRITERS = 4


def open_run(uri: str, name: str, barrier: Barrier, results: Queue) -> None:
    """In a child process: wait for the others, open a run on ``uri``, put ``(name, run id or None)``."""
    barrier.wait(timeout=120)  # everyone has imported MLflow: the first MLflow calls race
    results.put((name, TrackedRun.open(uri, "race", run_name=name).run_id))


@pytest.mark.slow  # 4 processes importing MLflow on 2 cores: ~45 s
def test_processes_opening_a_fresh_sqlite_store_at_once_keep_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # artifacts of a SQLite store without a server go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WRITERS), context.Queue()
    writers = [
        context.Process(target=open_run, args=(uri, f"writer-{k}", barrier, results)) for k in range(WRITERS)
    ]
    for writer in writers:
        writer.start()
    opened = dict(results.get(timeout=300) for _ in writers)
    for writer in writers:
        writer.join(timeout=60)

    assert None not in opened.values(), f"a writer could not open its run: {opened}"
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("race")
    assert experiment is not None
    names = sorted(run.info.run_name for run in client.search_runs([experiment.experiment_id]))
    assert names == [f"writer-{k}" for k in range(WRITERS)]
    assert (tmp_path / "mlflow.db.lock").is_file(), "the store was prepared under its lock file"
