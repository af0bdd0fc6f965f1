"""MLflow tracking for the pipeline's stages: where the store is, and a run that never stops training.

Every MLflow call of the project goes through an explicit ``MlflowClient(tracking_uri=...,
registry_uri=...)`` (`mlflow_client`); nothing sets MLflow's process-global tracking URI or
experiment, except the one model-logging block in `pipeline.tracking.fluent`.

* `tracking_uri()` -- ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db``
  (the project root is where ``params.yaml``/``dvc.yaml`` live: the stage's working directory).
* `check_tracking_uri()` -- the same URI, after checking that an HTTP server answers.
* `mlflow_client(uri)` -- the client for ``uri`` (tracking and registry); a SQLite store is created
  and migrated first, once, under a lock file (`pipeline.tracking.store.prepare_store`).
* `TrackedRun` -- one MLflow run, opened fresh or continued by id (a resumed training continues
  the run it started). By default every call swallows MLflow failures: a tracking server that is
  down or a locked database costs the metrics, never the training. The first failure warns once,
  says what was not logged, and turns the run off for the rest of the process. With
  ``strict=True`` (stage evaluate, where MLflow is part of the job) a failure raises
  `TrackingError` instead.
* `flatten()` -- a nested params dict as MLflow params (``{"train.lr": "0.02", ...}``).
* `fail_running_runs()` -- mark FAILED the runs still RUNNING that carry a tag (a driver's
  exception path: runs its workers opened must not stay RUNNING for ever).

Usage (the evaluate stage does the same with its own metrics, artifacts and model)::

    run = TrackedRun.open(tracking_uri(), "fpn", run_id=None, run_name="fpn-3f2a...", tags={...})
    run.log_params(flatten(params.to_dict()))
    run.log_metrics({"loss": 1.2, "lr": 0.02}, step=20)
    run.finish()

MLflow is imported inside the functions that use it, not at the top: the training loop
(`pipeline.train.loop`) and stage profile import this module and also run, with tracking off, where
MLflow is not installed (e.g. a bare GPU machine with torch only).
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.provenance import project_root
from pipeline.tracking.store import artifact_root, prepare_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models.model import ModelInfo

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# MLflow's own value limits: longer params are truncated, not rejected.
_MAX_PARAM_VALUE = 6000
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call
_MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # an unknown or malformed run id


class TrackingError(RuntimeError):
    """An MLflow call failed where tracking is part of the job (``strict``); the message names the URI."""


class TrackingUnavailable(TrackingError):
    """The MLflow tracking server does not answer; the message names its URI."""


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at ``<root>/mlflow.db`` (absolute)."""
    from_env = os.environ.get(TRACKING_URI_ENV, "").strip()
    if from_env:
        return from_env
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{(root.resolve() / 'mlflow.db').as_posix()}"


def check_tracking_uri(uri: str | None = None, *, timeout_s: float = 5.0) -> str:
    """``uri`` (default `tracking_uri()`), after checking that an HTTP server answers ``/health``.

    An unreachable server raises `TrackingUnavailable` in seconds instead of after MLflow's
    retries. Other URIs (SQLite, a database) are returned as they are. Changes no global state.
    """
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {err}") from err
    return uri


def mlflow_client(uri: str) -> MlflowClient:
    """The project's one way to talk to MLflow: a client for ``uri`` as tracking and registry store.

    A SQLite store is prepared first (`prepare_store`), so that processes opening a new one at once
    do not race in its schema migration.
    """
    from mlflow import MlflowClient

    prepare_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_exists(uri: str, run_id: str) -> bool:
    """True when the store at ``uri`` has run ``run_id``; other MLflow errors raise."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client(uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code in _MISSING_CODES:
            return False
        raise
    return True


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
    """One MLflow run that warns instead of raising (``strict``: raises `TrackingError`).

    ``run_id`` is None when MLflow was unreachable. Create with `TrackedRun.open` (new or
    continued run) or `TrackedRun.disabled` (no tracking).
    """

    def __init__(
        self, uri: str, run_id: str | None, *, problem: str | None = None, strict: bool = False
    ) -> None:
        self.uri = uri
        self.run_id = run_id
        self.strict = strict
        self._client: MlflowClient | None = None
        self._problem = problem  # why the run is off, once it is
        self._monitor: Any = None  # MLflow's SystemMetricsMonitor while `start_system_metrics` runs
        if run_id is not None:
            self._client = mlflow_client(uri)

    @property
    def active(self) -> bool:
        """True while MLflow calls are still being made."""
        return self.run_id is not None and self._problem is None

    @property
    def client(self) -> MlflowClient:
        """The run's client (for the registry); a disabled run has none and raises `TrackingError`."""
        if self._client is None:
            raise TrackingError(self._problem or f"run {self.run_id} has no MLflow client")
        return self._client

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
        strict: bool = False,
    ) -> TrackedRun:
        """Continue run ``run_id`` (set RUNNING again) or start a new one in ``experiment``.

        MLflow unreachable: warn that nothing of this run will be logged and return a
        disabled run; the caller carries on. ``strict``: raise `TrackingError` instead.
        """
        if not strict:
            _quiet_http_retries(uri)
        try:
            client = mlflow_client(uri)
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
                if tags:
                    for key, value in tags.items():
                        client.set_tag(run_id, key, str(value))
                return cls(uri, run_id, strict=strict)
            run = client.create_run(
                _experiment_id(client, uri, experiment), run_name=run_name, tags=dict(tags or {})
            )
            return cls(uri, run.info.run_id, strict=strict)
        except Exception as err:  # noqa: BLE001 - tracking must never stop the training
            what = f"run {run_id}" if run_id else f"a new run in experiment {experiment!r}"
            cause = f"MLflow at {uri} unreachable while opening {what} ({type(err).__name__}: {err})"
            if strict:
                raise TrackingError(cause) from err
            message = (
                f"{cause}; nothing of this run is logged to MLflow (params, metrics, model); training goes on"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            return cls(uri, None, problem=message)

    def _failed(self, what: str, err: BaseException) -> None:
        cause = f"MLflow at {self.uri} failed while logging {what} ({type(err).__name__}: {err})"
        if self.strict:
            raise TrackingError(f"{cause} to run {self.run_id}") from err
        self._problem = (
            f"{cause}; {what} and everything after it is not logged to run {self.run_id}; training goes on"
        )
        warnings.warn(self._problem, RuntimeWarning, stacklevel=3)
        log.warning(self._problem)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params (strings); logging the same value again on a resumed run is fine."""
        if not self.active:
            return
        from mlflow.entities import Param

        try:
            existing = self.client.get_run(self.run_id).data.params
            items = [Param(k, v) for k, v in params.items() if k not in existing]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])
        except Exception as err:  # noqa: BLE001
            self._failed("the params", err)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as their str)."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
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
                self.client.log_batch(self.run_id, metrics=items[start : start + _BATCH])
        except Exception as err:  # noqa: BLE001
            first, last = rows[0][0], rows[-1][0]
            self._failed(f"the metrics of steps {first}..{last}", err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload the file ``path`` into the run's folder ``artifact_path`` (the root when None)."""
        if not self.active:
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        except Exception as err:  # noqa: BLE001
            self._failed(f"the artifact {path}", err)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Save a matplotlib (or plotly) figure as the run's artifact ``artifact_file`` (e.g. ``x/y.png``)."""
        if not self.active:
            return
        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        except Exception as err:  # noqa: BLE001
            self._failed(f"the figure {artifact_file}", err)

    def log_pyfunc_model(self, name: str, **log_model_args: Any) -> ModelInfo | None:
        """``mlflow.pyfunc.log_model(name=name, **log_model_args)`` into this run; its `ModelInfo` or None.

        Goes through `pipeline.tracking.fluent.log_pyfunc_model`, the project's one use of MLflow's
        global state. The run's status stays the caller's (set by `finish`). A model that cannot be
        logged costs the model, not the run: it warns and the run stays on (``strict``: raises).
        """
        if not self.active:
            return None
        from pipeline.tracking import fluent  # imports MLflow (see the module docstring)

        assert self.run_id is not None  # active
        try:
            return fluent.log_pyfunc_model(self.uri, self.run_id, name=name, **log_model_args)
        except Exception as err:  # noqa: BLE001
            if self.strict:
                raise TrackingError(
                    f"MLflow at {self.uri}: the model {name!r} was not logged to run {self.run_id} "
                    f"({type(err).__name__}: {err})"
                ) from err
            message = (
                f"MLflow at {self.uri}: the model {name!r} was not logged to run {self.run_id} "
                f"({type(err).__name__}: {err}); the run goes on"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            return None

    def start_system_metrics(self, interval_s: float) -> None:
        """Log this machine's ``system/*`` metrics to the run every ``interval_s`` s until `stop_system_metrics`.

        MLflow's own monitor (a daemon thread): CPU and memory use, disk, network, and GPU
        utilisation and memory where ``nvidia-ml-py`` finds GPUs. Steps continue those of an
        earlier attempt (a resumed run). ``interval_s <= 0`` or a disabled run: nothing. A
        monitor that cannot start warns and costs nothing else.
        """
        if not self.active or interval_s <= 0 or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=self.uri
            )
            monitor.start()
        except Exception as err:  # noqa: BLE001 - metrics of the machine are never worth a training
            log.warning(
                "MLflow system metrics not logged to run %s: %s: %s", self.run_id, type(err).__name__, err
            )
            return
        self._monitor = monitor

    def stop_system_metrics(self) -> None:
        """Stop the monitor of `start_system_metrics` (its last samples are flushed); no-op if none runs."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED (or FAILED / KILLED), after stopping its system metrics."""
        self.stop_system_metrics()
        if not self.active:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001
            self._failed(f"the run status {status}", err)


def fail_running_runs(
    uri: str, experiment: str, tag: tuple[str, str], reason: str, *, keep: str | None = None
) -> list[str]:
    """Mark FAILED every RUNNING run of ``experiment`` at ``uri`` tagged ``tag`` = ``(key, value)``,
    except run ``keep``, with the tag ``error`` = ``reason``; returns their ids.

    For a driver whose workers opened the runs: it tags them with its own ``tag`` and calls this on
    its way out. Never raises: an MLflow failure here warns, so the caller's own error stays the
    one reported.
    """
    key, value = tag
    try:
        client = mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        query = f"tags.{key} = '{value}' and attributes.status = 'RUNNING'"
        runs = client.search_runs([found.experiment_id], filter_string=query)
        failed = [run.info.run_id for run in runs if run.info.run_id != keep]
        for run_id in failed:
            client.set_tag(run_id, "error", reason[:5000])
            client.set_terminated(run_id, status="FAILED")
        return failed
    except Exception as err:  # noqa: BLE001 - the caller is already failing for its own reason
        message = (
            f"MLflow at {uri}: runs tagged {key}={value} could not be marked FAILED "
            f"({type(err).__name__}: {err})"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning(message)
        return []


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name`` of store ``uri``, created when missing (another process may
    create it meanwhile), with its artifacts at `artifact_root` for a SQLite store."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        _warn_if_in_ray_temp(name, str(found.artifact_location or ""))
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_root(uri, name)))
    except Exception:  # noqa: BLE001 - created by another process since the lookup
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _warn_if_in_ray_temp(name: str, location: str) -> None:
    """Warn when experiment ``name`` keeps its files in a Ray session folder (``/tmp/ray/session_*``):
    a SQLite experiment created by an earlier version from a Ray worker; they go with that folder."""
    if "/ray/session_" not in location:
        return
    message = (
        f"MLflow experiment {name!r} keeps its runs' files and models in a Ray temp folder ({location}), "
        "which Ray does not keep; copy them out and log to a new experiment (`train.experiment`)"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)
