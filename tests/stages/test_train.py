"""`python -m stages.train`: bad params fail before any work; a second live run of the same name is
refused; a run that dies is FAILED in MLflow; `ray job submit` on a real local cluster, stopped
mid-run and submitted again (resumes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.dataset import read_data_hash
from pipeline.model_file import load_model_file
from pipeline.train.run_lock import hold_run_lock
from pipeline.train.stage import run_name
from tests.ray_cluster import LocalRayCluster, ray_cluster, registered_checkpoint  # noqa: F401 (fixture)
from tests.train_samples import tiny_data, tiny_params, write_params

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("stage-train-data"))


def stage_args(params: Path, data: Path, out: Path) -> list[str]:
    return [
        "--params", str(params), "--data", str(data), "--model-out", str(out / "models/model.pt"),
        "--metrics", str(out / "metrics/train.json"), "--plots", str(out / "plots/train_loss.csv"),
        "--storage-path", str(out / "runs"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"num_workers": 0}, "train.num_workers: must be >= 1, got 0"),  # the rest: test_train_preflight.py
        ({"lrr": 0.1}, "train.lrr: unknown key"),
    ],
)
def test_bad_params_fail_before_any_work(data: Path, tmp_path: Path, train: dict, message: str) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(**train))
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *stage_args(params, data, tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Ray" not in result.stderr, "no Ray cluster was started"
    assert not any((tmp_path / name).exists() for name in ("models", "metrics", "plots", "runs", "mlflow.db"))


def test_no_gpu_and_wrong_class_count_fail_naming_the_key(data: Path, tmp_path: Path) -> None:
    for raw, message in (
        (tiny_params(use_gpu=True), "train.use_gpu: true, but this machine has no GPU"),
        (tiny_params(model={"num_classes": 5}), "model.num_classes: 5, but"),
    ):
        params = write_params(tmp_path / "params.yaml", raw)
        result = subprocess.run(
            [sys.executable, "-m", "stages.train", *stage_args(params, data, tmp_path), "--no-ray"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("folder", ["nonexistent", "empty"])
def test_a_data_folder_that_is_not_preprocess_output_exits_2_naming_it(
    tmp_path: Path, folder: str, capsys: pytest.CaptureFixture
) -> None:
    """``--data /nonexistent`` gave a DatasetError traceback."""
    from stages import train

    data = tmp_path / folder
    if folder == "empty":
        data.mkdir()
    params = write_params(tmp_path / "params.yaml", tiny_params())
    assert train.main([*stage_args(params, data, tmp_path), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert f"stages.train: error: {data}" in err and "stage preprocess" in err
    assert "Traceback" not in err
    assert not any((tmp_path / name).exists() for name in ("models", "metrics", "plots", "runs"))


def submit(cluster: LocalRayCluster, args: list[str], uri: str, *, job_id: str, wait: bool) -> str:  # noqa: F811
    """``ray job submit`` of the stage from the repo root; returns the CLI's output."""
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
        "--submission-id", job_id, *([] if wait else ["--no-wait"]), "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": uri}}),
        "--", "python", "-m", "stages.train", *args,
    ]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=480, env=cluster.env())
        # A fresh head node's job agent needs a moment before it takes jobs.
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_ray_job_submit_killed_and_submitted_again_resumes(
    ray_cluster: LocalRayCluster,  # noqa: F811
    data: Path,
    tmp_path: Path,
) -> None:
    # A job runs in a temporary copy of --working-dir: every path and the tracking URI absolute.
    total = 40  # long enough that the stop lands mid-run on a fast day
    raw = tiny_params(iterations=total, checkpoint_every=3, log_every=1)
    args = stage_args(write_params(tmp_path / "params.yaml", raw), data, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = f"fpn-train-{uuid.uuid4().hex[:8]}"
    submit(ray_cluster, args, uri, job_id=first, wait=False)

    deadline = time.monotonic() + 300
    while registered_checkpoint(tmp_path / "runs") == 0:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    ray = str(Path(sys.executable).parent / "ray")
    stop = [ray, "job", "stop", "--address", ray_cluster.dashboard, first]
    subprocess.run(stop, capture_output=True, text=True, timeout=120, env=ray_cluster.env(), check=True)
    kept = registered_checkpoint(tmp_path / "runs")
    assert not (tmp_path / "models/model.pt").exists(), "the job was stopped mid-run"

    output = submit(ray_cluster, args, uri, job_id=f"{first}-again", wait=True)
    assert f"stages.train: {total} iterations" in output
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["iterations"] == total and metrics["attempts"] == 2
    steps = [
        int(line.split(",")[0]) for line in (tmp_path / "plots/train_loss.csv").read_text().splitlines()[1:]
    ]
    assert steps == list(range(1, total + 1)), "resumed, the step count continued"
    assert f"resuming at iteration {kept}" in output
    # Our per-step line reaches the job's log when the second job trained (the first may have
    # finished before the stop took effect). Not necessarily the very last line: Ray forwards a
    # worker's lines to the driver asynchronously, and the job may end before the last arrives.
    if kept < total:
        assert re.search(rf"\[train\] iter (\d+)/{total}", output), output[-3000:]
    assert "Reporting training result" not in output, "Ray Train's per-report INFO lines are silenced"

    loaded = load_model_file(tmp_path / "models/model.pt")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(loaded.extra["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == loaded.extra["run_name"]
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the resumed job continued the same run"
    # The model file as a plain artifact; no MLflow model (stage evaluate logs the run's one pyfunc).
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model_file")] == ["model_file/model.pt"]
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id]) == []


def stage_env(uri: str) -> dict[str, str]:
    """The environment of a stage subprocess run outside the checkout: this checkout's code (not the
    one the virtualenv has installed in editable mode), and the MLflow store ``uri``."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri}


def test_a_second_live_run_of_the_same_name_is_refused(data: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params())
    name = run_name(load_params(params), read_data_hash(data))
    with hold_run_lock(str(tmp_path / "runs"), name) as lock:  # another driver training this run
        result = subprocess.run(
            [sys.executable, "-m", "stages.train", *stage_args(params, data, tmp_path), "--no-ray"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env=stage_env(f"sqlite:///{tmp_path}/mlflow.db"),
        )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"run {name} is already training: its lock {lock} is held by pid {os.getpid()}" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs" / f"{name}-local").exists()


def test_a_run_that_dies_is_marked_failed_in_mlflow(data: Path, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(iterations=2, checkpoint_every=2))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = stage_args(params, data, tmp_path)
    blocker = tmp_path / "models" / "model.pt"  # a folder where the model file goes: writing it fails
    (blocker / "keep").mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *args, "--no-ray"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=stage_env(uri),
    )  # fmt: skip
    assert result.returncode != 0 and "IsADirectoryError" in result.stderr, result.stderr[-2000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.status for run in runs] == ["FAILED"], [(r.info.run_name, r.info.status) for r in runs]
    assert "IsADirectoryError" in runs[0].data.tags["error"]
    # The lock died with its holder: the same run starts again at once (and now finishes).
    blocker.joinpath("keep").rmdir()
    blocker.rmdir()
    again = subprocess.run(
        [sys.executable, "-m", "stages.train", *args, "--no-ray"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=stage_env(uri),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
