"""Elastic training (`pipeline.train.elastic`): the lr and the epoch position follow the world size;
a run that loses a node goes on with fewer workers from its latest checkpoint."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import params_from_dict
from pipeline.model_file import load_model_file
from pipeline.train.checkpoint import Progress
from pipeline.train.elastic import adapt_to_world_size
from pipeline.train.schedule import build_optimizer, build_scheduler
from tests.pipeline.train.test_ray_train import finish, read_status, start_stage, steps_in, wait_for
from tests.ray_cluster import LocalRayCluster, registered_checkpoint, start_cluster
from tests.train_samples import tiny_data, tiny_params, write_params


def restored(world_size: int, batch_in_epoch: int, iterations_done: int):
    t = params_from_dict(tiny_params(lr=0.08, lr_reference_batch=16, batch_size=2, warmup_iters=2)).train
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, t, world_size)
    scheduler = build_scheduler(optimizer, t)
    for _ in range(iterations_done):
        optimizer.step()
        scheduler.step()
    progress = Progress(iteration=iterations_done, batch_in_epoch=batch_in_epoch, world_size=world_size)
    return t, progress, optimizer, scheduler


@pytest.mark.parametrize(("old", "new", "position", "expected"), [(2, 1, 3, 6), (1, 2, 5, 3), (3, 2, 1, 2)])
def test_the_epoch_goes_on_after_the_batches_consumed(
    old: int, new: int, position: int, expected: int
) -> None:
    t, progress, optimizer, scheduler = restored(old, position, 4)
    adapt_to_world_size(progress, optimizer, scheduler, t, new)
    assert progress.batch_in_epoch == expected and progress.world_size == new
    # The lr is the one a run on `new` workers has at this iteration (linear in the global batch).
    _, _, fresh_optimizer, fresh_scheduler = restored(new, 0, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    fresh_optimizer.step()
    fresh_scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh_optimizer.param_groups[0]["lr"])


def test_the_same_world_size_changes_nothing() -> None:
    t, progress, optimizer, scheduler = restored(2, 3, 4)
    lr = optimizer.param_groups[0]["lr"]
    adapt_to_world_size(progress, optimizer, scheduler, t, 2)
    assert progress.batch_in_epoch == 3 and optimizer.param_groups[0]["lr"] == lr


def test_elastic_needs_a_range_and_the_torch_loader() -> None:
    with pytest.raises(
        ValueError, match=r"min_workers: must be 0 \(fixed\) or in \[1, num_workers \(2\)\], got 3"
    ):
        params_from_dict(tiny_params(num_workers=2, min_workers=3))
    with pytest.raises(ValueError, match=r"loader: ray_data plans each rank's batches for a fixed number"):
        params_from_dict(tiny_params(num_workers=2, min_workers=1, loader="ray_data"))
    assert params_from_dict(tiny_params(num_workers=2, min_workers=1)).train.elastic
    assert not params_from_dict(tiny_params(num_workers=2, min_workers=2)).train.elastic


@pytest.fixture
def two_worker_nodes() -> Iterator[LocalRayCluster]:
    """A head without CPUs (the driver's side) and two worker nodes of 1 CPU each."""
    cluster = start_cluster(num_cpus=0)
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


def kill_node_of(cluster: LocalRayCluster, pid: int) -> None:
    """SIGKILL the worker node whose processes include ``pid``: its raylet, its workers, all of it."""
    for node in cluster.nodes:
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        if any(p.pid == pid for p in tree):
            for process in tree:
                process.send_signal(signal.SIGKILL)
            return
    raise AssertionError(f"no worker node runs pid {pid}")


@pytest.mark.slow
def test_a_lost_node_leaves_one_worker_that_finishes_the_run(
    two_worker_nodes: LocalRayCluster, mlflow_server: str, tmp_path: Path
) -> None:
    data = tiny_data(tmp_path / "data")
    total = 16
    raw = tiny_params(
        num_workers=2, min_workers=1, cpus_per_worker=1, threads=1, iterations=total, checkpoint_every=4,
        log_every=1, max_failures=6,
    )  # fmt: skip
    root = tmp_path / "run"
    root.mkdir()
    stage = start_stage(
        two_worker_nodes, write_params(root / "params.yaml", raw), data, root, tracking_uri=mlflow_server
    )
    log, status = root / "stage.log", root / "status"
    wait_for(lambda: registered_checkpoint(root / "runs") > 0, "a registered checkpoint", stage, log)
    victim = read_status(status, 1)
    assert victim["world_size"] == 2 and victim["iteration"] < total
    killed_at = time.monotonic()
    kill_node_of(two_worker_nodes, victim["pid"])

    def resumed_alone() -> bool:
        rank0 = read_status(status, 0)
        return bool(rank0 and rank0["world_size"] == 1 and rank0["iteration"] > rank0["start_iteration"])

    wait_for(resumed_alone, "one worker training on", stage, log, timeout=420)
    rank0 = read_status(status, 0)
    print(
        f"elastic: node killed at iteration {victim['iteration']}; one worker resumed from iteration "
        f"{rank0['start_iteration']} ({victim['iteration'] - rank0['start_iteration']} iterations repeated), "
        f"training again {time.monotonic() - killed_at:.1f} s after the kill"
    )
    finish(stage, log, timeout=480)

    metrics = json.loads((root / "train.json").read_text())
    assert metrics["iterations"] == total and metrics["attempts"] >= 2
    last = read_status(status, 0)
    assert last["world_size"] == 1 and last["iteration"] == total, "one worker finished the run"
    assert steps_in(root / "loss.csv") == list(range(1, total + 1)), "no step lost, none counted twice"
    assert "resumed on 1 workers (the checkpoint's run had 2)" in log.read_text()
    # One MLflow run holds both phases: the lr halves with the global batch (4 -> 2 images).
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = load_model_file(root / "model.pt").extra["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert sorted(lrs) == list(range(1, total + 1))
    assert lrs[total] == pytest.approx(0.08 * 2 / 16)
