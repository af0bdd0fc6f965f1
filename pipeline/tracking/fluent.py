"""The project's one use of MLflow's fluent (process-global) API: logging an MLflow model into a run.

MLflow has no client call that logs an MLflow Model: ``mlflow.<flavor>.log_model`` writes to the
*active run* of the *global* tracking URI. Everything else in the project talks to MLflow through an
explicit client (`pipeline.tracking.run.mlflow_client`), so this module confines the global state to
one block.

`active_run(uri, run_id)` makes run ``run_id`` of the store at ``uri`` the active run inside the
block, and afterwards puts back what it changed:

* the global tracking URI, and the ``MLFLOW_TRACKING_URI`` variable that ``mlflow.set_tracking_uri``
  also writes;
* the active experiment, cleared inside the block (``mlflow.start_run(run_id=...)`` refuses a run
  of another experiment than the one a caller may have set with ``mlflow.set_experiment``);
* the run's status: leaving ``start_run``'s block ends the run (FINISHED, or FAILED on an error),
  but the run's owner (`pipeline.tracking.run.TrackedRun`) decides when it ends.

MLflow offers no public way to read or clear the global URI and active experiment it keeps, so the
block reads and restores them by their module attributes, here and nowhere else. Not thread-safe:
MLflow's fluent state belongs to the process.

`log_pyfunc_model(uri, run_id, **kwargs)` is ``mlflow.pyfunc.log_model(**kwargs)`` inside that block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.models.model import ModelInfo
from mlflow.tracking import fluent as _fluent_state
from mlflow.tracking._tracking_service import utils as _tracking_state

from pipeline.tracking.run import TRACKING_URI_ENV, mlflow_client


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI is ``uri`` inside the block, and what it was afterwards.

    Also for client calls whose MLflow implementation opens a default ``MlflowClient()``
    internally (the SQL registry store's ``create_model_version`` looks the logged model up
    that way), so they reach ``uri`` whatever an earlier caller set globally.
    """
    saved_env = os.environ.get(TRACKING_URI_ENV)
    saved_uri = _tracking_state._tracking_uri
    try:
        mlflow.set_tracking_uri(uri)
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # type: ignore[arg-type]  # None: unset again
        if saved_env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = saved_env


@contextlib.contextmanager
def active_run(uri: str, run_id: str) -> Iterator[None]:
    """Run ``run_id`` at ``uri`` is MLflow's active run inside the block (see the module docstring)."""
    client = mlflow_client(uri)
    status = client.get_run(run_id).info.status
    saved_experiment = _fluent_state._active_experiment_id
    try:
        with global_tracking_uri(uri):
            _fluent_state._active_experiment_id = None
            # nested: a caller's own active run, if any, stays active around this block.
            with mlflow.start_run(run_id=run_id, nested=True):
                yield
    finally:
        _fluent_state._active_experiment_id = saved_experiment
        client.update_run(run_id, status=status)


def log_pyfunc_model(uri: str, run_id: str, **log_model_args: Any) -> ModelInfo:
    """``mlflow.pyfunc.log_model(**log_model_args)`` into run ``run_id`` at ``uri``; its `ModelInfo`."""
    with active_run(uri, run_id):
        return mlflow.pyfunc.log_model(**log_model_args)
