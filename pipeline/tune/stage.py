"""Stage tune: a Ray Tune sweep over ``train:``/``model:`` keys, each trial a Ray Train run of the same loop.

`tune_sweep(raw_params, data_root, outputs, storage_path=None)` (None: ``storage.tune``):

1. checks ``tune:`` and its space (`pipeline.tune.search_space`) against the params, the data and
   the cluster before any work;
2. opens the sweep's MLflow run (the parent) in ``train.experiment``. When the tracking URI is a
   SQLite file, a local ``mlflow server`` on 127.0.0.1 owns it for the sweep
   (`pipeline.tracking.server`) and trials log over HTTP: parallel SQLite writers would fail with
   "database is locked";
3. runs ``ray.tune.Tuner`` on `run_trial`: the trial function builds and fits a ``TorchTrainer``
   (`pipeline.train.ray_train.build_trainer`, named after the trial) running `pipeline.train.loop`'s loop
   with the sampled params, ``train.iterations = tune.iterations`` and a checkpoint every
   ``tune.eval_every`` iterations. The loop validates at each checkpoint (``TrainJob.validation``,
   `pipeline.train.validation`): rank 0 scores the live model on the first ``tune.val_images``
   images of ``data.val_split`` on its own device (the GPU on a GPU cluster) and reports
   ``val_ap50``, ``val_ap`` and ``train_loss`` with the checkpoint. The Train ``RunConfig`` holds
   `HoldoutReportCallback`, a ``TuneReportCallback`` that forwards only those checkpoint reports
   to Tune (every Tune result then carries the scores). ASHA (``time_attr="iteration"``,
   ``max_t = tune.iterations``) stops weak trials; Optuna's TPE (or random search) proposes the
   next ones. Rank 0 of each trial logs to an MLflow child run (tag ``mlflow.parentRunId``),
   the scores included;
4. writes the best trial's sampled values as a params file (``{"train": {"lr": ...}}``, with the
   ``dvc exp run -S ...`` line that applies it in a comment) and a CSV of every trial.

Resources: a trial's function holds no CPU (only `TRIAL_DRIVER_MEMORY` of memory): its Train
workers hold ``train.num_workers x train.cpus_per_worker`` CPUs, and
``tune.max_concurrent_trials`` trials must fit the cluster at once (checked).

Ray Train's controller of a trial that ASHA stops dies with the trial; Ray Train's
``PlacementGroupCleaner`` then frees its workers' resources. It finds the cluster through the
state API, which needs the cluster's dashboard address when several Ray clusters run on one
machine: `connect` gives it to every process of a cluster it starts
(``RAY_API_SERVER_ADDRESS``); a cluster started with ``ray start`` should have it in its
environment (tests/ray_cluster.py does this).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline import cluster
from pipeline.cluster import check_fits
from pipeline.config import ConfigError, Params, TuneConfig, params_from_dict
from pipeline.data_staging import staged_data
from pipeline.dataset import SPLIT_FILE, read_categories, read_data_hash
from pipeline.io import atomic_write_text
from pipeline.provenance import git_commit, project_root
from pipeline.storage import join_location, resolve_location
from pipeline.tracking.run import TrackedRun, flatten, tracking_uri
from pipeline.tracking.server import serve_sqlite
from pipeline.train.init_weights import resolve_init_weights, share_init_weights
from pipeline.train.loop import TrainJob
from pipeline.train.preflight import check_num_classes, check_train_params
from pipeline.train.ray_train import build_trainer
from pipeline.train.validation import ValidationSpec
from pipeline.tune.results import (
    TuneError,
    best_params_text,
    best_row,
    best_sample,
    rows_csv,
    trial_rows,
)
from pipeline.tune.search_space import (
    SearchSpace,
    apply_sample,
    parse_space,
    set_param_args,
    trial_train_overrides,
)

log = logging.getLogger(__name__)

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved for a trial's function (Tune needs a non-empty request)
TRIAL_TAG = "tune.trial_id"
SWEEP_TAG = "tune.sweep"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class TuneOutputs:
    """The stage's output paths (dvc.yaml names them)."""

    best_params: Path  # YAML params file with the best trial's values of the searched keys
    results: Path  # CSV, one row per trial


@dataclass(frozen=True)
class Sweep:
    """What every trial needs; plain and picklable (Tune ships it to each trial)."""

    name: str
    raw_params: dict[str, Any]  # the params file as a dict: each trial applies its sample to it
    space: SearchSpace
    tune: TuneConfig
    data_root: str
    data_hash: str
    git_commit: str
    tracking_uri: str | None  # what trials log to (the HTTP server during a SQLite sweep)
    parent_run_id: str | None
    train_storage: str  # Ray Train runs of the trials: <train_storage>/<trial name>
    init_weights_file: str | None
    init_weights_ref: Any  # its bytes in Ray's object store (`share_init_weights`): no node needs the file

    def trial_params(self, sample: dict[str, Any]) -> Params:
        """The params a trial trains with: the sample applied, the length and checkpoints set by ``tune:``."""
        base = params_from_dict(self.raw_params, where="params")
        merged = apply_sample(self.raw_params, sample)
        train = trial_train_overrides(
            base.train, iterations=self.tune.iterations, eval_every=self.tune.eval_every
        )
        merged = apply_sample(merged, {f"train.{k}": v for k, v in train.items()})
        return params_from_dict(merged, where="trial params")

    def validation(self, params: Params) -> ValidationSpec:
        """What a trial's loop scores at each checkpoint: the first ``tune.val_images`` of ``data.val_split``."""
        return ValidationSpec(
            data_root=self.data_root,
            split=params.data.val_split,
            num_images=self.tune.val_images,
            every=self.tune.eval_every,
        )

    def run_tags(self, trial_id: str) -> tuple[tuple[str, str], ...]:
        tags = [(SWEEP_TAG, self.name), (TRIAL_TAG, trial_id)]
        if self.parent_run_id:
            tags.append((PARENT_TAG, self.parent_run_id))
        return tuple(tags)


class HoldoutReportCallback(TuneReportCallback):
    """``TuneReportCallback`` that forwards only the reports with a checkpoint: the scored ones.

    Runs in the trial's Ray Train controller. The loop adds the held-out scores (``val_ap50``,
    ``val_ap``, ``train_loss``) to every report that carries a checkpoint, on rank 0 (the
    metrics Tune gets; other ranks report NaN), with the checkpoint's ``iteration``; the reports
    between checkpoints are not forwarded, so every Tune result of a trial carries the metric
    ASHA compares. Scoring is no longer done here: it ran on the controller's CPU while every
    worker waited at the report barrier.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """The Tune trial function: fit one ``TorchTrainer`` (named after the trial) on the sampled params."""
    context = tune.get_context()
    sample = sweep.space.decode(config)
    params = sweep.trial_params(sample)
    job = TrainJob(
        params=params,
        data_root=sweep.data_root,
        run_name=context.get_trial_name(),
        data_hash=sweep.data_hash,
        git_commit=sweep.git_commit,
        tracking_uri=sweep.tracking_uri,
        init_weights_file=sweep.init_weights_file,
        init_weights_ref=sweep.init_weights_ref,
        run_tags=sweep.run_tags(context.get_trial_id()),
        validation=sweep.validation(params),
    )
    build_trainer(job, sweep.train_storage, callbacks=[HoldoutReportCallback()]).fit()


class TrialLedger(Callback):
    """Tune callback (runs in the driver): each trial's config, last result, and how it ended."""

    def __init__(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}

    def _entry(self, trial: Any) -> dict[str, Any]:
        entry = self.trials.setdefault(
            trial.trial_id, {"trial_id": trial.trial_id, "trial_name": str(trial), "status": "running"}
        )
        entry["config"] = dict(trial.config)
        return entry

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._entry(trial)["result"] = dict(result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        entry["status"] = "completed"
        entry.setdefault("result", dict(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        entry = self._entry(trial)
        entry["status"] = "error"
        error = trial.get_error()
        entry["error"] = f"{type(error).__name__}: {error}"[-2000:] if error else "unknown error"


def sweep_name(params: Params, data_hash: str) -> str:
    """``tune-<8 hex>-<UTC time>``: a hash of ``model:``, ``train:``, ``tune:`` and the data, and when."""
    plain = params.to_dict()
    defining = {k: plain[k] for k in ("model", "train", "tune")} | {"data_hash": data_hash}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()
    return f"tune-{digest[:8]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _search_algorithm(cfg: TuneConfig) -> Any:
    """Optuna's TPE (random for its first trials, then model-based), or Tune's random search."""
    if cfg.search == "random":
        from ray.tune.search.basic_variant import (
            BasicVariantGenerator,  # Tune's search modules: only the one used
        )

        return BasicVariantGenerator(random_state=cfg.seed)
    import optuna  # lazy: optuna is needed only for search: optuna
    from ray.tune.search.optuna import OptunaSearch

    startup = max(1, min(10, cfg.num_samples // 3))
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup))


def _finish_child_runs(uri: str, experiment: str, sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Mark each trial's run FINISHED / KILLED (stopped early) / FAILED; returns trial id -> run id."""
    from pipeline.tracking.run import mlflow_client

    run_ids: dict[str, str] = {}
    try:
        client = mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return run_ids
        runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep.name}'")
        by_trial = {run.data.tags.get(TRIAL_TAG): run for run in runs}
        for row in rows:
            run = by_trial.get(row["trial_id"])
            if run is None:
                continue
            run_ids[row["trial_id"]] = run.info.run_id
            status = {"finished": "FINISHED", "stopped_early": "KILLED"}.get(row["status"], "FAILED")
            client.set_tag(run.info.run_id, "tune.outcome", row["status"])
            client.set_terminated(run.info.run_id, status=status)
    except Exception as err:  # noqa: BLE001 - tracking must not cost the sweep's outputs
        log.warning("could not finish the trials' MLflow runs at %s: %s", uri, err)
    return run_ids


def _tuner(sweep: Sweep, storage: str, ledger: TrialLedger) -> Any:
    """``ray.tune.Tuner``: `run_trial` per trial, ASHA on ``iteration``, Optuna (or random) proposals."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg = sweep.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep), {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    )
    return tune.Tuner(
        trainable,
        param_space=sweep.space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
            search_alg=_search_algorithm(cfg),
            scheduler=ASHAScheduler(
                time_attr="iteration",
                max_t=cfg.iterations,
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
            ),
        ),
        # Tune callbacks belong here, in Tune's RunConfig (the Train RunConfig rejects them).
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage, callbacks=[ledger]),
    )


def _check_sweep_inputs(
    params: Params, raw_params: dict[str, Any], data_root: Path
) -> tuple[SearchSpace, str]:
    """The search space and the data hash; `ConfigError` naming the key or file first."""
    space = parse_space(params.tune.space, raw_params)
    check_train_params(params)
    check_num_classes(params, read_categories(data_root), f"{data_root / 'categories.json'}")
    if not (data_root / params.data.val_split / SPLIT_FILE).is_file():
        raise ConfigError(
            f"data.val_split: {data_root / params.data.val_split / SPLIT_FILE} not found: "
            "the held-out images come from the validation split"
        )
    return space, read_data_hash(data_root)


def _open_parent_run(params: Params, space: SearchSpace, name: str, data_hash: str) -> TrackedRun:
    """The sweep's MLflow run (trials are its children), with the sweep settings as params."""
    parent = TrackedRun.open(
        tracking_uri(), params.train.experiment, run_name=name, tags={SWEEP_TAG: name, "data_hash": data_hash}
    )
    parent.log_params(
        flatten({"tune": {k: v for k, v in params.to_dict()["tune"].items() if k != "space"}})
        | {f"tune.space.{d.key}": d.describe() for d in space.dimensions}
    )
    return parent


def _run_trials(
    params: Params, raw_params: dict[str, Any], space: SearchSpace, *, name: str, data_root: Path,
    data_hash: str, parent: TrackedRun, storage: str,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every trial (one MLflow server owns a SQLite store meanwhile); one row per trial."""
    with serve_sqlite(parent.uri, artifact_root=project_root() / "mlruns") as trial_uri:
        sweep = Sweep(
            name=name,
            raw_params=raw_params,
            space=space,
            tune=params.tune,
            data_root=staged_data(str(data_root), params.storage.data),  # where the trials read it
            data_hash=data_hash,
            git_commit=git_commit(),
            tracking_uri=trial_uri if parent.run_id else None,
            parent_run_id=parent.run_id,
            train_storage=join_location(storage, name, "train"),
            init_weights_file=(weights := resolve_init_weights(params)),
            init_weights_ref=share_init_weights(weights),  # connected: `run_tune` connects first
        )
        ledger = TrialLedger()
        _tuner(sweep, storage, ledger).fit()
        rows = trial_rows(ledger.trials, sweep.space, params.tune)
        experiment = params.train.experiment
        run_ids = _finish_child_runs(trial_uri, experiment, sweep, rows) if parent.run_id else {}
    for row in rows:
        row["mlflow_run_id"] = run_ids.get(row["trial_id"], "")
    if not rows:
        raise TuneError(f"sweep {sweep.name}: Tune ran no trial")
    return rows


def _publish_best(
    parent: TrackedRun, rows: list[dict[str, Any]], space: SearchSpace, cfg: TuneConfig, name: str,
    outputs: TuneOutputs,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Write the CSV and the best-params file, log the best trial to the parent run; (best row, sample)."""
    best = best_row(rows, cfg)
    atomic_write_text(outputs.results, rows_csv(rows))
    atomic_write_text(outputs.best_params, best_params_text(name, best, space, cfg))
    sample = best_sample(best, space)
    log.info("best trial %s: %s %.4f %s; wrote %s and %s", best["trial_id"], cfg.metric, best[cfg.metric], sample,
             outputs.best_params, outputs.results)  # fmt: skip
    parent.log_params(
        {f"best.{k}": json.dumps(v) if isinstance(v, list) else str(v) for k, v in sample.items()}
    )
    parent.set_tags({"best_trial_id": best["trial_id"], "best_run_id": best.get("mlflow_run_id", "")})
    parent.log_metrics({f"best_{cfg.metric}": float(best[cfg.metric])}, step=int(best["iteration"] or 0))
    parent.log_artifact(outputs.results)
    parent.log_artifact(outputs.best_params)
    return best, sample


def tune_sweep(
    raw_params: dict[str, Any],
    data_root: str | Path,
    outputs: TuneOutputs,
    *,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Run the sweep, write ``outputs``; returns a summary (best trial, counts, times, MLflow parent run).

    ``storage_path`` (the stage's ``--storage-path``) overrides ``storage.tune`` of the params.
    """
    started = time.perf_counter()
    params = params_from_dict(raw_params, where="params")
    cfg = params.tune
    data_root = Path(data_root).resolve()
    space, data_hash = _check_sweep_inputs(params, raw_params, data_root)
    storage = resolve_location(storage_path if storage_path is not None else params.storage.tune)
    name = sweep_name(params, data_hash)
    where = cluster.connect()
    cluster.check_tracking_reachable(tracking_uri(), cluster.node_count(), where)
    check_fits(params, cluster.resources(), where, runs=cfg.max_concurrent_trials, nodes=cluster.node_resources(),
               runs_key="tune.max_concurrent_trials")  # fmt: skip
    parent = _open_parent_run(params, space, name, data_hash)
    log.info("sweep %s: %d trials over %s on %s", name, cfg.num_samples, ", ".join(space.keys), where)
    try:
        rows = _run_trials(params, raw_params, space, name=name, data_root=data_root, data_hash=data_hash,
                           parent=parent, storage=storage)  # fmt: skip
        best, sample = _publish_best(parent, rows, space, cfg, name, outputs)
    except BaseException as err:
        parent.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        parent.finish("FAILED")
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
    parent.finish("FINISHED")
    counts = {
        status: sum(r["status"] == status for r in rows) for status in ("finished", "stopped_early", "error")
    }
    return {
        "sweep": name, "trials": len(rows), **counts, "best_trial_id": best["trial_id"], "best": sample,
        "metric": cfg.metric, "value": best[cfg.metric], "mlflow_parent_run_id": parent.run_id,
        "storage": join_location(storage, name), "wall_time_s": round(time.perf_counter() - started, 1),
        "set_param_args": set_param_args(sample),
    }  # fmt: skip
