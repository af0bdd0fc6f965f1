"""pipeline.tracking.pyfunc refuses pickled models before loading them; pipeline.tracking.fluent
puts MLflow's global state back. A real MLflow store: SQLite in tmp_path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.models.model import ModelInfo
from mlflow.tracking import fluent as fluent_state
from mlflow.tracking._tracking_service import utils as tracking_state
from PIL import Image

from pipeline.tracking.fluent import active_run
from pipeline.tracking.pyfunc import DetectorPyfunc, UnsafeModelError, load_detector
from pipeline.tracking.run import TrackedRun, mlflow_client
from stages import predict

REPO_ROOT = Path(__file__).resolve().parents[3]
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite store; artifacts go to ./mlruns, so the test runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def pytorch_pickle(name: str) -> ModelInfo:
    """What stage train used to log: mlflow.pytorch in its pickle format."""
    return mlflow.pytorch.log_model(
        torch.nn.Linear(2, 2), name=name, serialization_format="pickle", pip_requirements=["torch"]
    )


def cloudpickled_pyfunc(name: str) -> ModelInfo:
    """The detector's wrapper logged as an object (cloudpickle) instead of as code."""
    return mlflow.pyfunc.log_model(name=name, python_model=DetectorPyfunc(), pip_requirements=["torch"])


@pytest.mark.parametrize(
    ("log_model", "why"),
    [
        (
            pytorch_pickle,
            "it is an mlflow.pytorch model serialized with pickle (mlflow.pytorch.pickle_module)",
        ),
        (cloudpickled_pyfunc, "its python model is pickled (python_model.pkl, cloudpickle)"),
    ],
)
def test_a_pickled_model_is_refused_before_loading_naming_the_uri(
    store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    log_model: Callable[[str], ModelInfo],
    why: str,
) -> None:
    run = TrackedRun.open(store, "pickles", strict=True)
    with active_run(store, run.run_id):
        info = log_model("model")
    client = mlflow_client(store)
    client.create_registered_model("pickled")
    client.create_model_version("pickled", source=info.model_uri, model_id=info.model_id)
    client.set_registered_model_alias("pickled", "champion", "1")

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before being checked")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", loaded)
    monkeypatch.setattr(mlflow.pytorch, "load_model", loaded)
    for uri in (info.model_uri, f"runs:/{run.run_id}/model", "models:/pickled@champion", "models:/pickled/1"):
        message = rf"^{re.escape(uri)}: refused to load: {re.escape(why)}: loading it unpickles"
        with pytest.raises(UnsafeModelError, match=message):
            load_detector(uri, tracking_uri=store)

    # The command line says the same and exits 2.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "out"
    image = tmp_path / "any.jpg"  # a real image: predict reads every image's header before the model
    Image.new("RGB", (32, 24)).save(image)
    assert predict.main(["--model", "models:/pickled@champion", "--out", str(out), str(image)]) == 2
    assert f"models:/pickled@champion: refused to load: {why}" in capsys.readouterr().err
    assert not out.exists()


def test_pickle_deserialization_is_off_unless_the_user_allows_it() -> None:
    """Importing pipeline.tracking turns MLflow's pickle loading off, keeping a value the user set."""
    code = "import os, pipeline.tracking; print(os.environ['MLFLOW_ALLOW_PICKLE_DESERIALIZATION'])"
    for env_value, expected in ((None, "false"), ("true", "true")):
        env = {k: v for k, v in os.environ.items() if k != PICKLE_ENV}
        if env_value is not None:
            env[PICKLE_ENV] = env_value
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == expected


def test_active_run_puts_mlflows_global_state_back(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller with its own global tracking URI and active experiment (another store, another id).
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setattr(tracking_state, "_tracking_uri", other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    monkeypatch.setattr(fluent_state, "_active_experiment_id", "424242")
    run = TrackedRun.open(store, "fluent", strict=True)

    with active_run(store, run.run_id):
        assert mlflow.get_tracking_uri() == store
        assert mlflow.active_run().info.run_id == run.run_id
    assert (tracking_state._tracking_uri, os.environ["MLFLOW_TRACKING_URI"]) == (other, other)
    assert fluent_state._active_experiment_id == "424242"
    assert mlflow.active_run() is None
    assert mlflow_client(store).get_run(run.run_id).info.status == "RUNNING", "the run's owner ends it"
