"""Stage tune end to end: 2 tiny trials on a real Ray cluster, a real MLflow server over SQLite, the outputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.tune.stage import PARENT_TAG, SWEEP_TAG, TRIAL_TAG
from tests.ray_cluster import LocalRayCluster, ray_cluster  # noqa: F401 (session fixture)
from tests.train_samples import tiny_data, tiny_params, write_params

SPACE = {
    "train.lr": {"type": "loguniform", "low": 0.01, "high": 0.1},
    "model.roi_batch_per_image": {"type": "choice", "values": [16, 32]},
}
SIZES = {"min_size": 128, "max_size": 160}


def sweep_params(path: Path, **tune: object) -> Path:
    raw = tiny_params(SIZES, iterations=10, checkpoint_every=5, log_every=5)
    raw["tune"] = {
        "num_samples": 2, "max_concurrent_trials": 2, "iterations": 10, "eval_every": 5, "grace_period": 5,
        "val_images": 4, "seed": 1, "space": SPACE, **tune,
    }  # fmt: skip
    return write_params(path, raw)


def run_stage(params: Path, data: Path, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "stages.tune", "--params", str(params), "--data", str(data),
        "--best-params", str(root / "best.yaml"), "--results", str(root / "tune.csv"),
        "--storage-path", str(root / "runs"),
    ]  # fmt: skip
    # cwd: the stage's project root, where a SQLite store's artifacts go (mlruns/).
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_trials_best_params_csv_and_mlflow_children(
    ray_cluster: LocalRayCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = tiny_data(tmp_path / "data", train_images=12, val_images=4)
    params = sweep_params(tmp_path / "params.yaml")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.perf_counter()
    done = run_stage(params, data, tmp_path, ray_cluster.env(MLFLOW_TRACKING_URI=store))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    print(f"2-trial sweep: {seconds:.0f} s")
    # Each trial's rank 0 scored its checkpoints in the training loop, on its device: its lines reach the log.
    scored = [line for line in (done.stdout + done.stderr).splitlines() if "[train] validation iter" in line]
    assert scored, done.stderr[-6000:]
    print("\n".join(scored))

    # The CSV: one row per trial, every trial scored on the held-out images.
    rows = list(csv.DictReader((tmp_path / "tune.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] in ("finished", "stopped_early"), row
        assert int(row["iteration"]) in (5, 10) and 0.0 <= float(row["val_ap50"]) <= 1.0
        assert 0.01 <= float(row["train.lr"]) <= 0.1 and row["model.roi_batch_per_image"] in ("16", "32")
    assert any(row["status"] == "finished" for row in rows), "ASHA lets the best trial run to the end"

    # The best params: only the searched keys, valid merged into the params file.
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert set(best) == {"train", "model"} and set(best["train"]) == {"lr"}
    assert set(best["model"]) == {"roi_batch_per_image"}
    merged = load_params(params, {f"{s}.{k}": v for s, keys in best.items() for k, v in keys.items()})
    assert (
        merged.train.lr == best["train"]["lr"]
        and merged.model.roi_batch_per_image == best["model"]["roi_batch_per_image"]
    )
    best_row = next(r for r in rows if float(r["train.lr"]) == best["train"]["lr"])
    assert "dvc exp run -S train.lr=" in (tmp_path / "best.yaml").read_text()
    assert "apply: dvc exp run -S train.lr=" in done.stdout

    # MLflow: one parent run for the sweep, the 2 trials as its children (rank 0 of each trial).
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("fpn")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert {c.data.tags[TRIAL_TAG] for c in children} == {r["trial_id"] for r in rows}
    assert {c.info.run_id for c in children} == {r["mlflow_run_id"] for r in rows}
    for child in children:
        assert child.data.tags[SWEEP_TAG] == parent.data.tags[SWEEP_TAG]
        assert child.info.status in ("FINISHED", "KILLED") and "val_ap50" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 5
    assert parent.data.tags["best_trial_id"] == best_row["trial_id"]
    assert parent.data.params["best.train.lr"] == str(best["train"]["lr"])
    assert "best_val_ap50" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"best.yaml", "tune.csv"}
    # Each trial was a Ray Train run named after the trial, with its checkpoints.
    sweep_dir = tmp_path / "runs" / parent.data.tags[SWEEP_TAG]
    for row in rows:
        assert list((sweep_dir / "train" / row["trial_name"]).glob("checkpoint_*")), row["trial_name"]


def test_bad_space_fails_before_any_work(tmp_path: Path) -> None:
    params = sweep_params(
        tmp_path / "params.yaml", space={"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}
    )
    done = run_stage(params, tmp_path / "no-data", tmp_path, env=dict(os.environ))
    assert done.returncode == 2
    assert "tune.space.train.lrr: unknown key" in done.stderr
    assert not (tmp_path / "best.yaml").exists() and not (tmp_path / "tune.csv").exists()
