"""MLflow tracking for the pipeline's stages: where the store is, and a run that never stops training.

* `tracking_uri()` -- ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db``
  (the project root is where ``params.yaml``/``dvc.yaml`` live: the stage's working directory).
* `TrackedRun` -- one MLflow run, opened fresh or continued by id (a resumed training continues
  the run it started). Every call swallows MLflow failures: a tracking server that is down or
  a locked database costs the metrics, never the training. The first failure warns once, says
  what was not logged, and turns the run off for the rest of the process.
* `flatten()` -- a nested params dict as MLflow params (``{"train.lr": "0.02", ...}``).

Usage (the evaluate stage does the same with its own metrics)::

    run = TrackedRun.open(tracking_uri(), "fpn", run_id=None, run_name="fpn-3f2a...", tags={...})
    run.log_params(flatten(params.to_dict()))
    run.log_metrics({"loss": 1.2, "lr": 0.02}, step=20)
    run.finish()
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.provenance import project_root

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow's own value limits: longer params are truncated, not rejected.
_MAX_PARAM_VALUE = 6000
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at ``<root>/mlflow.db`` (absolute)."""
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{(root.resolve() / 'mlflow.db').as_posix()}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.02}}`` -> ``{"train.lr": "0.02"}`` (lists as their str, None as "null")."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = "null" if value is None else str(value)
            flat[name] = text[:_MAX_PARAM_VALUE]
    return flat


def _quiet_http_retries(uri: str) -> None:
    """Keep a dead tracking server from stalling training for minutes.

    MLflow retries HTTP calls 7 times with exponential backoff by default (minutes per call).
    Training reports metrics every few steps, so fail fast instead; a value the user set wins.
    """
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


class TrackedRun:
    """One MLflow run that warns instead of raising. ``run_id`` is None when MLflow was unreachable.

    Create with `TrackedRun.open` (new or continued run) or `TrackedRun.disabled` (no tracking).
    """

    def __init__(self, uri: str, run_id: str | None, *, problem: str | None = None) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client: Any = None
        self._problem = problem  # why the run is off, once it is
        if run_id is not None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def active(self) -> bool:
        """True while MLflow calls are still being made."""
        return self.run_id is not None and self._problem is None

    @classmethod
    def disabled(cls, reason: str = "tracking disabled") -> TrackedRun:
        """A run that logs nothing (e.g. on ranks other than 0)."""
        return cls("", None, problem=reason)

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> TrackedRun:
        """Continue run ``run_id`` (set RUNNING again) or start a new one in ``experiment``.

        MLflow unreachable: warn that nothing of this run will be logged and return a
        disabled run; the caller carries on.
        """
        _quiet_http_retries(uri)
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                if tags:
                    for key, value in tags.items():
                        client.set_tag(run_id, key, str(value))
                return cls(uri, run_id)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                try:
                    experiment_id = client.create_experiment(experiment)
                except Exception:  # noqa: BLE001 - another process may have created it meanwhile
                    found = client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
                    experiment_id = found.experiment_id
            run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
            return cls(uri, run.info.run_id)
        except Exception as err:  # noqa: BLE001 - tracking must never stop the training
            what = f"run {run_id}" if run_id else f"a new run in experiment {experiment!r}"
            message = (
                f"MLflow at {uri} unreachable while opening {what} ({type(err).__name__}: {err}); "
                "nothing of this run is logged to MLflow (params, metrics, model); training goes on"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            return cls(uri, None, problem=message)

    def _failed(self, what: str, err: BaseException) -> None:
        self._problem = (
            f"MLflow at {self.uri} failed while logging {what} ({type(err).__name__}: {err}); "
            f"{what} and everything after it is not logged to run {self.run_id}; training goes on"
        )
        warnings.warn(self._problem, RuntimeWarning, stacklevel=3)
        log.warning(self._problem)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params (strings); logging the same value again on a resumed run is fine."""
        if not self.active:
            return
        from mlflow.entities import Param

        try:
            existing = self._client.get_run(self.run_id).data.params
            items = [Param(k, v) for k, v in params.items() if k not in existing]
            for start in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[start : start + 100])
        except Exception as err:  # noqa: BLE001
            self._failed("the params", err)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        try:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as err:  # noqa: BLE001
            self._failed("the tags", err)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one step's metrics (non-finite values are skipped: MLflow stores them badly)."""
        self.log_metric_rows([(step, metrics)])

    def log_metric_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Log several steps' metrics in as few calls as possible: ``[(step, {name: value}), ...]``."""
        if not self.active or not rows:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(name, float(value), now, int(step))
            for step, metrics in rows
            for name, value in metrics.items()
            if math.isfinite(float(value))
        ]
        try:
            for start in range(0, len(items), _BATCH):
                self._client.log_batch(self.run_id, metrics=items[start : start + _BATCH])
        except Exception as err:  # noqa: BLE001
            first, last = rows[0][0], rows[-1][0]
            self._failed(f"the metrics of steps {first}..{last}", err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        except Exception as err:  # noqa: BLE001
            self._failed(f"the artifact {path}", err)

    def log_pytorch_model(
        self,
        model: Any,
        *,
        name: str = "model",
        signature: Any = None,
        pip_requirements: list[str] | None = None,
        registered_model_name: str | None = None,
    ) -> str | None:
        """`mlflow.pytorch.log_model` into this run (pickle format); returns the model URI or None.

        ``pip_requirements`` given explicitly skips MLflow's slow requirement inference (~8 s).
        """
        if not self.active:
            return None
        try:
            import mlflow
            import mlflow.pytorch

            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name=name,
                    serialization_format="pickle",
                    signature=signature,
                    pip_requirements=pip_requirements,
                    registered_model_name=registered_model_name,
                )
            return str(info.model_uri)
        except Exception as err:  # noqa: BLE001
            # A model that cannot be logged costs the model, not the run: metrics and the
            # final status are still logged.
            message = (
                f"MLflow at {self.uri}: the model {name!r} was not logged to run {self.run_id} "
                f"({type(err).__name__}: {err}); the run goes on"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            return None
        finally:
            # start_run(run_id=...) ends by marking the run FINISHED (FAILED when log_model
            # raised); the run's status stays the caller's, set by finish().
            try:
                self._client.update_run(self.run_id, status="RUNNING")
            except Exception as err:  # noqa: BLE001
                self._failed(f"the run status after logging the model {name!r}", err)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED)."""
        if not self.active:
            return
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001
            self._failed(f"the run status {status}", err)
