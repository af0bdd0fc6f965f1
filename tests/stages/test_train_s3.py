"""`python -m stages.train --storage-path s3://...`: Ray Train's checkpoints in a real S3 server
(``moto_server``), and the same config run again resumes from them.

The driver starts a local Ray cluster (no ``RAY_ADDRESS``), whose processes inherit its
environment: the S3 endpoint and credentials reach Ray only through ``AWS_*`` variables, as on a
user's cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.model_file import load_model_file
from tests.conftest import running_mlflow_server
from tests.train_samples import tiny_data, tiny_params, write_params

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_stage(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


@pytest.mark.slow
def test_checkpoints_go_to_the_bucket_and_a_second_run_resumes_from_them(s3_server, tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", tiny_params(iterations=6, checkpoint_every=3))
    storage = f"s3://{s3_server.bucket}/train-s3/runs"
    args = [
        "--params", str(params), "--data", str(data), "--model-out", str(tmp_path / "models/model.pt"),
        "--metrics", str(tmp_path / "metrics/train.json"), "--plots", str(tmp_path / "plots/loss.csv"),
        "--storage-path", storage,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    env.update(s3_server.env)
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),  # this checkout's code, also in Ray's workers
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "OMP_NUM_THREADS": "2",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
    )

    run_stage(args, tmp_path, env)
    first = json.loads((tmp_path / "metrics/train.json").read_text())
    assert first["iterations"] == 6 and first["attempts"] == 1
    extra = load_model_file(tmp_path / "models/model.pt").extra
    name = extra["run_name"]
    keys = s3_server.keys(f"train-s3/runs/{name}/")
    checkpoints = sorted({k.split("/")[3] for k in keys if k.split("/")[3].startswith("checkpoint_0")})
    assert checkpoints == ["checkpoint_00000003", "checkpoint_00000006"], keys
    assert f"train-s3/runs/{name}/checkpoint_00000006/train_state.pt" in keys
    snapshot = json.loads(s3_server.read(f"train-s3/runs/{name}/checkpoint_manager_snapshot.json"))
    assert snapshot["latest_checkpoint_result"]["metrics"]["iteration"] == 6
    assert not (tmp_path / "s3:").exists() and not (REPO_ROOT / "s3:").exists(), "no URI became a folder"
    assert (tmp_path / "runs" / "locks" / f"{name}.lock").is_file(), "the run lock is local"

    # The same config again: Ray finds the run's checkpoint in the bucket and resumes from it.
    (tmp_path / "models/model.pt").unlink()
    output = run_stage(args, tmp_path, env)
    again = json.loads((tmp_path / "metrics/train.json").read_text())
    assert "resuming at iteration 6" in output, output[-3000:]
    assert again["iterations"] == 6 and again["attempts"] == 2
    resumed = load_model_file(tmp_path / "models/model.pt").extra
    assert resumed["run_name"] == name
    assert resumed["mlflow_run_id"] == extra["mlflow_run_id"], "the resumed run continued its MLflow run"
    steps = [int(line.split(",")[0]) for line in (tmp_path / "plots/loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6], "no step trained twice"


def test_no_ray_refuses_a_storage_uri_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages import train

    params = write_params(tmp_path / "params.yaml", tiny_params())
    args = [
        "--params", str(params), "--data", str(tmp_path / "data"), "--model-out", str(tmp_path / "m.pt"),
        "--metrics", str(tmp_path / "t.json"), "--plots", str(tmp_path / "t.csv"),
        "--storage-path", "s3://bkt/runs", "--no-ray",
    ]  # fmt: skip
    assert train.main(args) == 2
    assert "--storage-path s3://bkt/runs: without Ray (--no-ray)" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("m.pt", "t.json", "runs", "s3:"))


def test_no_ray_refuses_a_storage_uri_from_params_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without --storage-path the Ray storage is params' storage.train, and errors name that key."""
    from stages import train

    params = write_params(tmp_path / "params.yaml", {**tiny_params(), "storage": {"train": "s3://bkt/runs"}})
    args = [
        "--params", str(params), "--data", str(tmp_path / "data"), "--model-out", str(tmp_path / "m.pt"),
        "--metrics", str(tmp_path / "t.json"), "--plots", str(tmp_path / "t.csv"), "--no-ray",
    ]  # fmt: skip
    assert train.main(args) == 2
    assert "storage.train s3://bkt/runs: without Ray (--no-ray)" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("m.pt", "t.json", "runs", "s3:"))


@pytest.mark.slow
def test_workers_read_the_data_from_the_bucket(s3_server, tmp_path: Path) -> None:
    """The preprocessed data only in the bucket: training (Ray Data streaming it, validation on it) reads it there."""
    local = tiny_data(tmp_path / "data")
    client = s3_server.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_server.bucket, f"data-s3/{path.relative_to(local)}")
    shutil.rmtree(local)  # nothing left on this machine's disk
    raw = tiny_params(
        iterations=4, checkpoint_every=2, eval_every=2, val_images=2, loader="ray_data", cpus_per_worker=0.5
    )
    params = write_params(tmp_path / "params.yaml", raw)
    args = [
        "--params", str(params), "--data", f"s3://{s3_server.bucket}/data-s3",
        "--model-out", str(tmp_path / "models/model.pt"), "--metrics", str(tmp_path / "metrics/train.json"),
        "--plots", str(tmp_path / "plots/loss.csv"), "--storage-path", f"s3://{s3_server.bucket}/data-s3-runs",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    env.update(s3_server.env)
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "OMP_NUM_THREADS": "2",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
    )
    run_stage(args, tmp_path, env)
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["iterations"] == 4 and metrics["best_iteration"] in (2, 4)
    assert metrics["best_checkpoint"].startswith(f"s3://{s3_server.bucket}/data-s3-runs/"), metrics
    assert not (tmp_path / "s3:").exists() and not (REPO_ROOT / "s3:").exists(), "no URI became a folder"


@pytest.mark.slow
def test_the_tracking_server_keeps_the_runs_artifacts_in_the_bucket(s3_server, tmp_path: Path) -> None:
    """`mlflow server --artifacts-destination s3://...`: what training logs (the model file, the loss
    CSV) goes through the server to the bucket; the client needs no S3 credentials."""
    data = tiny_data(tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", tiny_params(iterations=2, checkpoint_every=2))
    root = tmp_path / "mlflow"
    root.mkdir()
    with running_mlflow_server(
        root, artifacts=f"s3://{s3_server.bucket}/mlartifacts", env=s3_server.env
    ) as uri:
        args = [
            "--params", str(params), "--data", str(data), "--model-out", str(tmp_path / "models/model.pt"),
            "--metrics", str(tmp_path / "metrics/train.json"), "--plots", str(tmp_path / "plots/loss.csv"),
            "--storage-path", str(tmp_path / "runs"), "--no-ray",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
        env.update({"PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI": uri})  # no AWS_* here
        run_stage(args, tmp_path, env)
    run_id = load_model_file(tmp_path / "models/model.pt").extra["mlflow_run_id"]
    keys = s3_server.keys("mlartifacts/")
    assert any(k.endswith(f"/{run_id}/artifacts/model_file/model.pt") for k in keys), keys
    assert any(k.endswith(f"/{run_id}/artifacts/loss.csv") for k in keys), keys
    assert not (root / "artifacts").exists(), "nothing kept on the server's disk"
