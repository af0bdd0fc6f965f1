"""Stage train, end to end: checks, the run's name, Ray Train (or one process), the outputs.

`train(params, data_root, outputs, ...)`:

1. checks the params before any work (`pipeline.train.preflight`), reads the data's categories and
   hash (``manifest.json``), resolves ``train.init_weights`` to a local file (may download);
2. names the run after what defines it: `run_name` hashes the model and training params and
   the data hash, so the same config resumes its checkpoints and a changed one starts fresh;
3. trains: `pipeline.train.ray_train.fit` (``RAY_ADDRESS``'s cluster or a local one), or with
   ``use_ray=False`` the same loop in this process (`pipeline.train.sessions.LocalSession`);
4. writes the model file, the metrics JSON and the loss CSV, and finishes the MLflow run that
   rank 0 opened: final metrics, the loss CSV and the model file as artifacts (``model_file/``).
   With ``train.eval_every`` the loop scores a checkpoint every that many iterations on the
   first ``train.val_images`` images of ``data.val_split`` (rank 0, on its device; the AP curve
   goes to MLflow) and the best checkpoint by ``val_ap`` is kept beside the latest
   (`pipeline.train.best`): the metrics JSON and the MLflow run name it (``best_checkpoint``,
   ``best_iteration``, ``best_val_ap``). The model file is the last iteration's either way.
   No MLflow model is logged here: the run's one model is the pyfunc stage evaluate logs
   (`pipeline.tracking.pyfunc`), and nothing is pickled.

The Ray storage is ``params.storage.train``, or ``storage_path`` when given (``--storage-path``):
a folder or an object-store URI (``s3://bucket/runs``, `pipeline.storage`); a URI needs Ray
(``use_ray=False`` keeps checkpoints in a local folder and refuses one).
Steps 3 and 4 hold the run's lock (`pipeline.train.run_lock`): a second live run of the same name
is refused with `RunLockedError`. Every MLflow run this driver's training opens is tagged
``train_driver=<host>:<pid>:<random>``; when training or writing the outputs raises (Ctrl-C
included), those still RUNNING are marked FAILED (`pipeline.tracking.run.fail_running_runs`), and
on success so are those a restarted worker left behind. A driver killed outright (SIGKILL) cannot
do this: its runs stay RUNNING.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fpn import build_detector
from pipeline import cluster
from pipeline.cluster import check_fits
from pipeline.config import ConfigError, Params
from pipeline.data_staging import staged_data
from pipeline.dataset import DatasetError, read_categories, read_data_hash
from pipeline.io import atomic_write_text
from pipeline.model_file import save_model_file
from pipeline.provenance import git_commit
from pipeline.storage import is_uri, join_location, local_copies, location_exists, resolve_location
from pipeline.tracking.run import TrackedRun, fail_running_runs, flatten, tracking_uri
from pipeline.train.best import BestCheckpoint
from pipeline.train.checkpoint import Progress, history_rows
from pipeline.train.init_weights import resolve_init_weights, share_init_weights
from pipeline.train.loop import LOSS_NAMES, TrainJob, train_worker
from pipeline.train.preflight import check_num_classes, check_train_params
from pipeline.train.run_lock import hold_run_lock
from pipeline.train.sessions import LocalSession
from pipeline.train.validation import ValidationSpec

log = logging.getLogger(__name__)

# train: keys that do not change what is learned (where things go, how often to log, how many
# retries, data-loading processes): left out of the run's name so changing them resumes.
NAME_NEUTRAL_TRAIN_KEYS = frozenset(
    {
        "experiment",
        "log_every",
        "checkpoint_every",
        "max_failures",
        "loader_workers",
        "loader",  # the same batches either way (`pipeline.train.streaming`)
        "min_workers",  # how far an elastic run may shrink, not what it learns at full size
        "resize_check_s",  # when an elastic run looks for joined nodes
        # validation leaves training bit for bit unchanged (`pipeline.train.validation`)
        "eval_every",
        "val_images",
        "system_metrics_s",
    }
)
# train: keys added after run names were first given, named only away from their default (their
# default is what the code did before them), so runs started before they existed keep their names.
NAMED_WHEN_SET_TRAIN_KEYS = {"cpu_amp": "off"}
PLOT_COLUMNS = ("step", "loss", *LOSS_NAMES, "lr")
MODEL_FILE_ARTIFACT_DIR = "model_file"  # the run's copy of the model file: model_file/<name>.pt
DRIVER_TAG = "train_driver"  # MLflow tag naming the driver whose training opened the run


@dataclass(frozen=True)
class TrainOutputs:
    """The stage's output paths (dvc.yaml names them)."""

    # Each a local path or an object-store URI (``s3://...``: written locally, then uploaded whole).
    model: str | Path  # the model file (`pipeline.model_file`)
    metrics: str | Path  # DVC metrics JSON
    plots: str | Path  # DVC plots CSV: step, loss, each loss term, lr


def run_name(params: Params, data_hash: str) -> str:
    """``fpn-<12 hex>``: a hash of ``model:``, ``train:`` and the data hash.

    ``train:`` less `NAME_NEUTRAL_TRAIN_KEYS`, and less each of `NAMED_WHEN_SET_TRAIN_KEYS` at its default.
    """
    raw = params.to_dict()
    train = {
        k: v
        for k, v in raw["train"].items()
        if k not in NAME_NEUTRAL_TRAIN_KEYS and NAMED_WHEN_SET_TRAIN_KEYS.get(k, object()) != v
    }
    defining = {"model": raw["model"], "train": train, "data_hash": data_hash}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    return f"fpn-{digest[:12]}"


def train(
    params: Params,
    data_root: str | Path,
    outputs: TrainOutputs,
    *,
    storage_path: str | None = None,
    use_ray: bool = True,
    status_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train, write ``outputs``, and return the metrics written to ``outputs.metrics``.

    ``storage_path`` (the stage's ``--storage-path``) overrides ``params.storage.train``.
    Raises `ConfigError` for bad params and `DatasetError` naming ``data_root`` when it is not
    a folder written by stage preprocess, both before any work.
    """
    started = time.perf_counter()
    check_train_params(params)
    source = "--storage-path" if storage_path is not None else "storage.train"
    storage_path = storage_path if storage_path is not None else params.storage.train
    if not use_ray and is_uri(storage_path):
        raise ConfigError(
            f"{source} {storage_path}: without Ray (--no-ray) checkpoints go to a local folder; "
            "give a folder, or drop --no-ray to keep them in object storage"
        )
    data_root = resolve_location(str(data_root))  # a folder made absolute, or a URI unchanged
    if not (location_exists(data_root) if is_uri(data_root) else Path(data_root).is_dir()):
        raise DatasetError(
            f"{data_root}: no such folder (--data is the output of stage preprocess, e.g. data/preprocessed, "
            "or its copy in object storage, s3://...)"
        )
    categories = read_categories(data_root)
    check_num_classes(params, categories, join_location(data_root, "categories.json"))
    data_hash = read_data_hash(data_root)
    if use_ray:  # a local --data copied once to storage.data, for workers on other nodes
        data_root = staged_data(data_root, params.storage.data)
    name = run_name(params, data_hash)
    storage = resolve_location(storage_path)
    uri = tracking_uri()
    driver = (DRIVER_TAG, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    job = TrainJob(
        params=params,
        data_root=data_root,
        run_name=name,
        data_hash=data_hash,
        git_commit=git_commit(),
        tracking_uri=uri,
        init_weights_file=None,
        status_dir=str(Path(status_dir).resolve()) if status_dir else None,
        run_tags=(driver,),
        validation=validation_spec(params, data_root),
    )
    with hold_run_lock(storage, name):
        try:
            state, best = _fit(job, storage, use_ray=use_ray)
            metrics = write_outputs(
                params, job, state, categories, outputs, wall_time_s=time.perf_counter() - started, best=best
            )
        except ConfigError:  # refused by a check before training: no MLflow run was opened
            raise
        except BaseException as err:
            fail_running_runs(uri, params.train.experiment, driver, f"{type(err).__name__}: {err}")
            raise
    if metrics["mlflow_run_id"]:  # runs opened by a worker that died and was restarted
        reason = f"a restarted worker of run {name} went on in MLflow run {metrics['mlflow_run_id']}"
        fail_running_runs(uri, params.train.experiment, driver, reason, keep=metrics["mlflow_run_id"])
    return metrics


def validation_spec(params: Params, data_root: str) -> ValidationSpec | None:
    """``train.eval_every``'s periodic validation on ``data.val_split``; None when it is 0 (off)."""
    t = params.train
    if not t.eval_every:
        return None
    return ValidationSpec(
        data_root=data_root, split=params.data.val_split, num_images=t.val_images, every=t.eval_every
    )


def _fit(job: TrainJob, storage: str, *, use_ray: bool) -> tuple[dict[str, Any], BestCheckpoint | None]:
    """Run ``job`` to its end with Ray Train (or in this process): the final checkpoint's state and the best one."""
    params, name = job.params, job.run_name
    if use_ray:
        from pipeline.train import ray_train  # lazy: imports Ray (seconds), which --no-ray never needs

        where = cluster.connect()
        if job.tracking_uri:
            cluster.check_tracking_reachable(job.tracking_uri, cluster.node_count(), where)
        t = params.train
        # Elastic: the run starts with what fits, at least min_workers (`pipeline.train.elastic`).
        least = dataclasses.replace(t, num_workers=t.min_workers, min_workers=0) if t.elastic else t
        check_fits(
            dataclasses.replace(params, train=least),
            cluster.resources(),
            where,
            nodes=cluster.node_resources(),
        )
        weights = resolve_init_weights(params)
        job = dataclasses.replace(
            job, init_weights_file=weights, init_weights_ref=share_init_weights(weights)
        )
        gloo = params.train.num_workers > 1 and not params.train.use_gpu
        cluster.check_nodes(
            job.data_root, params.data.train_split, storage, job.tracking_uri or "", gloo=gloo, where=where
        )
        log.info("training run %s (storage %s) on %s", name, storage, where)
        return ray_train.fit(job, storage)
    if params.train.num_workers != 1:
        log.warning("train.num_workers=%d ignored without Ray: one process", params.train.num_workers)
    local = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    check_fits(
        dataclasses.replace(
            params, train=dataclasses.replace(params.train, num_workers=1, cpus_per_worker=1.0)
        ),
        local,
        "this machine",
    )
    job = dataclasses.replace(job, init_weights_file=resolve_init_weights(params))
    session = LocalSession(
        Path(storage) / f"{name}-local", device=torch.device("cuda" if params.train.use_gpu else "cpu")
    )
    log.info("training run %s in this process (checkpoints in %s)", name, session.directory)
    train_worker(job, session)
    state = session.restore()
    assert state is not None, "the loop always ends with a checkpoint"
    return state, session.best()


def summary_metrics(params: Params, state: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
    """Final loss values (mean of the last ``train.log_every`` steps), throughput, counts, times."""
    rows = history_rows(state)
    progress = Progress.from_dict(state["progress"])
    window = rows[-params.train.log_every :] if rows else []
    metrics: dict[str, Any] = {}
    for column in ("loss", *LOSS_NAMES):
        metrics[column] = sum(r[column] for r in window) / len(window) if window else None
    metrics.update(
        {
            "loss_last_steps": len(window),
            "lr": rows[-1]["lr"] if rows else None,
            "iterations": progress.iteration,
            "epochs": progress.epoch + (1 if progress.batch_in_epoch else 0),
            "images_seen": progress.images_seen,
            "images_per_s": progress.images_seen / progress.train_seconds if progress.train_seconds else None,
            "train_time_s": round(progress.train_seconds, 2),
            "wall_time_s": round(wall_time_s, 2),
            "attempts": progress.attempts,
        }
    )
    return metrics


def plots_csv(state: dict[str, Any]) -> str:
    """``step,loss,loss_rpn_cls,loss_rpn_box,loss_cls,loss_box,lr`` per optimizer step."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PLOT_COLUMNS)
    for row in history_rows(state):
        writer.writerow([int(row["step"]), *(f"{row[c]:.6g}" for c in PLOT_COLUMNS[1:])])
    return buffer.getvalue()


def write_outputs(
    params: Params,
    job: TrainJob,
    state: dict[str, Any],
    categories: list[dict[str, Any]],
    outputs: TrainOutputs,
    *,
    wall_time_s: float,
    best: BestCheckpoint | None = None,
) -> dict[str, Any]:
    """Model file, metrics JSON, plots CSV; then the MLflow run's final metrics, artifacts and status.

    ``best``: the best scored checkpoint (periodic validation), named in the metrics and the run.
    """
    metrics = summary_metrics(params, state, wall_time_s)
    if best is not None:
        metrics.update({f"best_{k}": v for k, v in best.scores.items()})
        metrics.update(best_iteration=best.iteration, best_checkpoint=best.location)
        log.info("best checkpoint: %s (iteration %d, %s)", best.location, best.iteration, best.scores)
    run_id = state["run"].get("mlflow_run_id")
    run = TrackedRun.disabled("no tracking URI")
    if job.tracking_uri:
        # Rank 0 opened the run; if MLflow was down then, this tries once more with a new run.
        run = TrackedRun.open(
            job.tracking_uri,
            params.train.experiment,
            run_id=run_id,
            run_name=job.run_name,
            tags={
                "run_name": job.run_name,
                "data_hash": job.data_hash,
                "git_commit": job.git_commit,
                **dict(job.run_tags),
            },
        )
        if run_id is None:
            run.log_params(flatten(params.to_dict()))
        run_id = run.run_id or run_id

    model = build_detector(params.model)
    model.load_state_dict(state["model"])
    model.eval()
    extra = {
        "mlflow_run_id": run_id,
        "data_hash": job.data_hash,
        "git_commit": job.git_commit,
        "run_name": job.run_name,
    }
    with local_copies([outputs.model, outputs.metrics, outputs.plots]) as (
        model_file,
        metrics_file,
        plots_file,
    ):
        save_model_file(model_file, model, params.model, categories, extra)
        atomic_write_text(metrics_file, json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(plots_file, plots_csv(state))
        run.log_artifact(plots_file)
        run.log_artifact(model_file, MODEL_FILE_ARTIFACT_DIR)
    log.info("wrote %s, %s, %s", outputs.model, outputs.metrics, outputs.plots)

    final_step = int(metrics["iterations"])
    run.log_metrics(
        {f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None},
        step=final_step,
    )
    if best is not None:
        run.set_tags({"best_checkpoint": best.location, "best_iteration": best.iteration})
    run.finish("FINISHED")
    metrics_out = dict(metrics)
    metrics_out["mlflow_run_id"] = run_id
    metrics_out["run_name"] = job.run_name
    return metrics_out
