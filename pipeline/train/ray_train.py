"""Ray Train wiring: the loop of `pipeline.train.loop` on N workers with DDP, checkpoints and retries.

``TorchTrainer(train_loop_per_worker=ray_worker)`` with

* ``ScalingConfig(num_workers, use_gpu, resources_per_worker={"CPU": cpus_per_worker[, "GPU": 1]})``
  from ``train:`` (``num_workers=(min_workers, num_workers)`` when elastic, `pipeline.train.elastic`); DDP over NCCL on GPUs, gloo on CPUs (``TorchConfig(backend=...)``);
* ``RunConfig(name=<run name>, storage_path, failure_config=FailureConfig(max_failures),
  checkpoint_config=CheckpointConfig(num_to_keep=2))``; when the job validates, ranked by
  ``val_ap`` (`pipeline.train.best`): the latest and the 2 best are kept;
* with ``train.loader: ray_data``, one Ray Dataset per (rank, epoch) (`pipeline.train.streaming`)
  and ``DataConfig(datasets_to_split=[])``: each worker reads its own rank's plan.

After a worker dies, Ray restarts the worker group and the loop resumes from
``ray.train.get_checkpoint()``; a new `fit` with the same ``(storage_path, name)`` -- the same
run started again after the whole job was killed -- resumes too. The name is derived from what
defines the run (`pipeline.train.stage.run_name`), so a changed config starts fresh.

On a multi-node cluster, ``storage_path`` and the data must be on storage every node sees
(NFS, or an ``s3://`` URI for ``storage_path``).

Measured trap: ``ray.train.report`` (the loop calls it every ``train.log_every`` steps) blocks
until the controller has collected the previous report, and the controller polls every 2 s
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``). Keep ``log_every`` steps well above 2 s of training,
or the loop spends its time waiting. A checkpoint reported just before a crash may not be
registered yet; the run then resumes from the one before.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pipeline.train.best import BEST_METRIC, BestCheckpoint, best_of
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.loop import TrainJob, train_worker
from pipeline.train.sessions import RaySession
from pipeline.train.streaming import plan_datasets

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # besides the latest, which Ray always keeps


def ray_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: one rank of the run (``config["job"]`` is the `TrainJob`)."""
    # Our INFO lines reach the driver's log once: Ray Train already routes the worker's
    # stdout through the root logger, so a root handler here would print everything twice.
    ours = logging.getLogger("pipeline")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    _quiet_ray_report_lines()
    train_worker(config["job"], RaySession())


def _quiet_ray_report_lines() -> None:
    """Drop Ray Train V2's INFO line per ``ray.train.report`` (the whole metrics dict, every report).

    Our own ``[train] iter ...`` line says the same once per ``train.log_every``. Ray names that
    logger after its source file, not a ``ray.*`` name, so it is addressed through the module.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay, nothing else changes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def build_trainer(job: TrainJob, storage_path: str, *, callbacks: list[Any] | None = None) -> Any:
    """The `TorchTrainer` for ``job``, run named ``job.run_name`` under ``storage_path``.

    ``callbacks`` go into the Train ``RunConfig`` (e.g. Tune's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = job.params.train
    data: dict[str, Any] = {}
    if t.loader == "ray_data":  # each worker takes its own rank's datasets whole (not split by Ray)
        data = {
            "datasets": plan_datasets(
                job.data_root, job.params.data.train_split, batch_size=t.batch_size, seed=t.seed,
                flip_prob=t.flip_prob, world_size=t.num_workers, iterations=t.iterations,
            ),
            "dataset_config": DataConfig(datasets_to_split=[]),
        }  # fmt: skip
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        ray_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=(t.min_workers, t.num_workers) if t.elastic else t.num_workers,
            elastic_resize_monitor_interval_s=t.resize_check_s,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=KEEP_CHECKPOINTS,
                checkpoint_score_attribute=BEST_METRIC if job.validation is not None else None,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
        **data,
    )


def fit(job: TrainJob, storage_path: str) -> tuple[dict[str, Any], BestCheckpoint | None]:
    """Run the training to the end (resuming when a checkpoint exists).

    Returns the final checkpoint's state and the best kept checkpoint by ``val_ap`` (None when
    the job does not validate).
    """
    result = build_trainer(job, storage_path).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {job.run_name} under {storage_path} ended without a checkpoint")
    best = best_of((checkpoint_location(c), m) for c, m in result.best_checkpoints or [])
    with result.checkpoint.as_directory() as directory:
        return load_checkpoint(directory), best


def checkpoint_location(checkpoint: Any) -> str:
    """A Ray ``Checkpoint``'s folder, or its URI when on object storage (``s3://bucket/...``)."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
