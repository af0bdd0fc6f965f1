"""pipeline.tracking.run against a real MLflow store (SQLite) and a dead tracking server."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.provenance import git_commit
from pipeline.tracking.run import (
    TrackedRun,
    TrackingError,
    TrackingUnavailable,
    check_tracking_uri,
    flatten,
    tracking_uri,
)
from pipeline.tracking.store import artifact_root
from tests.conftest import free_port


def test_tracking_uri_env_wins_else_sqlite_under_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_flatten_nested_params() -> None:
    flat = flatten({"train": {"lr": 0.02, "lr_steps": [3, 4], "init_weights": None}, "model": {"d": 64}})
    assert flat == {
        "train.lr": "0.02",
        "train.lr_steps": "[3, 4]",
        "train.init_weights": "null",
        "model.d": "64",
    }
    assert flatten({}) == {}


def test_git_commit_outside_git_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


def test_run_logs_and_continues_by_id(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = TrackedRun.open(uri, "exp-a", run_name="fpn-abc", tags={"data_hash": "d1"})
    assert run.active and run.run_id
    run.log_params({"train.lr": "0.02"})
    run.log_metric_rows([(1, {"loss": 2.0, "lr": 0.01}), (2, {"loss": 1.5, "lr": 0.02, "bad": float("nan")})])

    # A resumed training continues the same run; re-logging an equal param is fine.
    again = TrackedRun.open(uri, "exp-a", run_id=run.run_id)
    again.log_params({"train.lr": "0.02", "train.batch_size": "4"})
    again.log_metrics({"loss": 1.0}, step=3)
    again.finish()
    assert again.active, "no call should have failed"

    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "fpn-abc"
    assert got.data.tags["data_hash"] == "d1"
    assert got.data.params == {"train.lr": "0.02", "train.batch_size": "4"}
    losses = [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")]
    assert sorted(losses) == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert client.get_metric_history(run.run_id, "bad") == []
    assert len(client.search_runs([got.info.experiment_id])) == 1


def test_dead_server_warns_and_carries_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="unreachable.*nothing of this run is logged"):
        run = TrackedRun.open(uri, "exp", run_name="x")
    assert not run.active and run.run_id is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a disabled run stays silent
        run.log_params({"a": "1"})
        run.log_metrics({"loss": 1.0}, step=1)
        assert run.log_pyfunc_model("model", python_model="model_code.py") is None
        run.finish()
    assert time.perf_counter() - started < 30, "a dead server must not stall training for minutes"


def test_failure_mid_run_turns_logging_off_with_one_warning(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    run = TrackedRun.open(f"sqlite:///{db}", "exp")
    run.log_metrics({"loss": 1.0}, step=1)
    run.run_id = "does-not-exist"  # every further call fails in the real store
    with pytest.warns(RuntimeWarning, match="the metrics of steps 2..2.*training goes on"):
        run.log_metrics({"loss": 0.5}, step=2)
    assert not run.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.log_metrics({"loss": 0.4}, step=3)


def test_a_model_that_cannot_be_logged_leaves_the_run_running_then_finished(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun.open(uri, "exp")
    with pytest.warns(RuntimeWarning, match="the model 'model' was not logged.*the run goes on"):
        missing_code = str(tmp_path / "no_such_model_code.py")
        assert run.log_pyfunc_model("model", python_model=missing_code, pip_requirements=["torch"]) is None
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    run.log_metrics({"loss": 0.5}, step=1)  # still logging
    run.finish()
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["loss"] == 0.5


def test_strict_run_raises_naming_the_uri_and_what_was_not_logged(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun.open(uri, "exp", strict=True)
    run.run_id = "does-not-exist"
    with pytest.raises(TrackingError, match=f"MLflow at {uri} failed while logging the tags"):
        run.set_tags({"a": "1"})


def test_unreachable_tracking_server_fails_fast_naming_it() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking server {uri} is unreachable"):
        check_tracking_uri(uri)
    assert time.monotonic() - start < 10


def test_new_experiments_keep_their_files_beside_the_sqlite_store(tmp_path: Path, monkeypatch) -> None:
    """A Ray worker or Tune trial runs in a temp folder: MLflow's default artifact root (./mlruns,
    from the working directory) would put the runs' files and models there."""
    store, elsewhere = tmp_path / "store", tmp_path / "ray-temp-folder"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}/mlflow.db"
    run = TrackedRun.open(uri, "fpn ablation/1", run_name="fpn-abc")
    (tmp_path / "eval.json").write_text("{}")
    run.log_artifact(tmp_path / "eval.json", "evaluation")
    run.finish()

    root = store.resolve() / "mlruns" / "fpn_ablation_1"
    assert MlflowClient(uri).get_experiment_by_name("fpn ablation/1").artifact_location == str(root)
    assert (root / run.run_id / "artifacts" / "evaluation" / "eval.json").is_file()
    assert not any(elsewhere.iterdir())
    assert artifact_root(uri, "fpn ablation/1") == str(root)
    assert artifact_root("http://127.0.0.1:5000", "fpn") is None  # a server decides for itself


def test_an_experiment_left_in_a_ray_temp_folder_is_named_in_a_warning(tmp_path: Path) -> None:
    """Stores from before artifact_root: the experiment a Ray worker created lives in /tmp/ray."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    temp = "/tmp/ray/session_2026-12-01_11-55-42_482964_20878/artifacts/fpn-9692cf297c23/mlruns/1"
    TrackedRun.open(uri, "other").finish()  # creates the store
    MlflowClient(uri).create_experiment("fpn", artifact_location=temp)

    with pytest.warns(RuntimeWarning, match="Ray temp folder") as caught:
        run = TrackedRun.open(uri, "fpn", run_name="fpn-abc")
    assert run.active and temp in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrackedRun.open(uri, "other").finish()  # beside the store: no warning
