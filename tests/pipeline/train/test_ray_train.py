"""Ray Train on a real local cluster: 2 CPU workers over gloo stay in sync; a killed worker resumes; validation.

The whole job killed and started again: tests/stages/test_train.py (via `ray job submit`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.train import UserCallback

from pipeline import cluster
from pipeline.config import params_from_dict
from pipeline.model_file import load_model_file
from pipeline.train.best import best_of
from pipeline.train.loop import TrainJob
from pipeline.train.ray_train import build_trainer, checkpoint_location
from pipeline.train.validation import VALIDATION_METRICS, ValidationSpec
from tests.ray_cluster import LocalRayCluster, ray_cluster, registered_checkpoint  # noqa: F401 (fixture)
from tests.train_samples import tiny_data, tiny_params, write_params

pytestmark = pytest.mark.slow
TWO_WORKERS = {"num_workers": 2, "cpus_per_worker": 0.5, "threads": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("ray-train-data"))


def read_status(directory: Path, rank: int) -> dict | None:
    try:
        return json.loads((directory / f"rank{rank}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def start_stage(
    cluster: LocalRayCluster, params: Path, data: Path, root: Path, *, tracking_uri: str | None = None
) -> subprocess.Popen:
    """``python -m stages.train`` on ``cluster`` (outputs under ``root``; MLflow: ``tracking_uri`` or a SQLite file there)."""
    command = [
        sys.executable, "-m", "stages.train", "--params", str(params), "--data", str(data),
        "--model-out", str(root / "model.pt"), "--metrics", str(root / "train.json"),
        "--plots", str(root / "loss.csv"), "--storage-path", str(root / "runs"), "--status-dir", str(root / "status"),
    ]  # fmt: skip
    env = cluster.env(MLFLOW_TRACKING_URI=tracking_uri or f"sqlite:///{root}/mlflow.db")
    log = (root / "stage.log").open("ab")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, what: str, process: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(
                f"the stage ended (rc {process.returncode}) before {what}:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the stage did not finish:\n{log.read_text()[-4000:]}") from None
    assert rc == 0, log.read_text()[-4000:]


def steps_in(plots: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in plots.read_text().splitlines()[1:]]


@pytest.mark.parametrize("loader", ["torch", "ray_data"])
def test_two_workers_stay_in_sync_and_a_killed_worker_resumes(
    ray_cluster: LocalRayCluster,  # noqa: F811
    data: Path,
    tmp_path: Path,
    loader: str,
) -> None:
    total = 16
    raw = tiny_params(
        **TWO_WORKERS, iterations=total, checkpoint_every=4, log_every=1, max_failures=2, loader=loader
    )
    stage = start_stage(ray_cluster, write_params(tmp_path / "params.yaml", raw), data, tmp_path)
    status, log = tmp_path / "status", tmp_path / "stage.log"

    wait_for(lambda: registered_checkpoint(tmp_path / "runs") > 0, "a registered checkpoint", stage, log)
    victim = read_status(status, 1)
    kept = registered_checkpoint(tmp_path / "runs")
    os.kill(victim["pid"], signal.SIGKILL)  # the worker process itself, mid-run
    assert victim["iteration"] < total, "the run must still be going"
    finish(stage, log)

    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["iterations"] == total and metrics["attempts"] == 2
    assert metrics["images_seen"] == total * 2 * 2  # global batch: 2 workers x 2 images
    rank0, rank1 = read_status(status, 0), read_status(status, 1)
    assert rank1["pid"] != victim["pid"], "Ray started a new worker"
    assert rank1["start_iteration"] >= kept > 0, "resumed from a checkpoint, not from scratch"
    assert steps_in(tmp_path / "loss.csv") == list(range(1, total + 1)), "the step count continued"
    # DDP keeps the replicas identical: both ranks hold the same weights after the last step,
    # and they are the weights of the model file.
    assert rank0["world_size"] == 2 and rank0["pid"] != rank1["pid"]
    assert rank0["iteration"] == rank1["iteration"] == total
    assert rank0["weights_checksum"] == rank1["weights_checksum"]
    loaded = load_model_file(tmp_path / "model.pt")
    checksum = sum(p.double().sum().item() for p in loaded.model.parameters())
    assert checksum == pytest.approx(rank0["weights_checksum"], abs=1e-6)
    # Ray kept the newest two checkpoints of the run named after its config.
    run_dir = tmp_path / "runs" / loaded.extra["run_name"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000012",
        "checkpoint_00000016",
    ]
    # One MLflow run (rank 0 only, continued after the restart), lr scaled to the global batch of 4.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fpn")
    # Rank 0 created the experiment from its Ray temp working folder; its files still go beside
    # the database (MLflow's default, ./mlruns, would have put them in that temp folder).
    assert experiment.artifact_location == str(tmp_path.resolve() / "mlruns" / "fpn")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [loaded.extra["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == set(
        range(1, total + 1)
    )
    lrs = client.get_metric_history(runs[0].info.run_id, "lr")
    assert max(m.value for m in lrs) == pytest.approx(0.08 * 4 / 16)


REPO_ROOT = Path(__file__).resolve().parents[3]


class RecordReports(UserCallback):
    """Ray Train callback (runs in the controller): each report's per-rank metrics as a JSON line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps({"checkpoint": checkpoint is not None, "metrics": metrics}) + "\n")


def drive_validating_run(data: str, storage: str, record: str) -> None:
    """The driver of a 2-worker run validating at each checkpoint (its own process: Ray reads the
    cluster's token from the environment when it is imported)."""
    params = params_from_dict(tiny_params(**TWO_WORKERS, iterations=4, checkpoint_every=2, log_every=2))
    job = TrainJob(
        params=params, data_root=data, run_name="validating", data_hash="h", git_commit="c",
        tracking_uri=None, init_weights_file=None,
        validation=ValidationSpec(data_root=data, split="val2017", num_images=3, every=2),
    )  # fmt: skip
    with cluster.connected(log_to_driver=True):
        result = build_trainer(job, storage, callbacks=[RecordReports(record)]).fit()
    assert result.checkpoint is not None
    # Ray keeps the checkpoints ranked by rank 0's val_ap (`pipeline.train.best`).
    best = best_of((checkpoint_location(c), m) for c, m in result.best_checkpoints)
    assert best is not None and best.iteration in (2, 4) and Path(best.location).is_dir(), best


def test_rank0_scores_on_its_worker_and_rank1_reports_nan(
    ray_cluster: LocalRayCluster,  # noqa: F811
    data: Path,
    tmp_path: Path,
) -> None:
    record = tmp_path / "reports.jsonl"
    args = ", ".join(repr(str(p)) for p in (data, tmp_path / "runs", record))
    code = f"from tests.pipeline.train.test_ray_train import drive_validating_run as run; run({args})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=ray_cluster.env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["metrics"][0]["iteration"], r["checkpoint"]) for r in reports] == [(2, True), (4, True)]
    for report in reports:
        rank0, rank1 = report["metrics"]
        assert set(VALIDATION_METRICS) <= set(rank0) and set(VALIDATION_METRICS) <= set(rank1)
        assert 0.0 <= rank0["val_ap50"] <= 1.0 and math.isfinite(rank0["train_loss"])
        assert all(math.isnan(rank1[k]) for k in VALIDATION_METRICS), "scored once, by rank 0"
    # Rank 0's lines reach the driver (the first at least: Ray forwards a worker's output
    # asynchronously, so the last may arrive after the driver has exited).
    assert "[train] validation iter 2: " in done.stdout + done.stderr, "rank 0's line reaches the driver"


def test_ray_data_streams_the_batches_the_dataloader_gives(
    ray_cluster: LocalRayCluster,  # noqa: F811
    data: Path,
    tmp_path: Path,
) -> None:
    # 12 images, 2 ranks x batch 2: 3 batches an epoch per rank, so 7 steps span 3 epochs.
    losses = {}
    for loader in ("torch", "ray_data"):
        root = tmp_path / loader
        root.mkdir()
        raw = tiny_params(**TWO_WORKERS, iterations=7, checkpoint_every=7, log_every=1, loader=loader)
        stage = start_stage(ray_cluster, write_params(root / "params.yaml", raw), data, root)
        finish(stage, root / "stage.log")
        losses[loader] = (root / "loss.csv").read_text()
    assert steps_in(tmp_path / "ray_data" / "loss.csv") == list(range(1, 8))
    # The same images, flips and order on each rank: the same losses, step for step.
    assert losses["ray_data"] == losses["torch"]
    a, b = (
        load_model_file(tmp_path / loader / "model.pt").model.state_dict() for loader in ("torch", "ray_data")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
