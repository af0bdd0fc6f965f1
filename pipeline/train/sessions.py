"""Where the training loop reports to: Ray Train's worker session, or a local folder.

The loop (`pipeline.train.loop.train_worker`) sees only the `Session` interface, so the very same
loop runs under Ray Train on N workers and in one plain process for debugging:

* `RaySession` -- ``ray.train.report`` (a barrier every rank reaches; rank 0 hands over the
  checkpoint folder, Ray copies it into ``<storage_path>/<run name>/checkpoint_<iter>``) and
  ``ray.train.get_checkpoint()`` (the latest checkpoint after a worker failure, or of an
  earlier ``fit()`` with the same run name).
* `LocalSession` -- the same semantics on one process: checkpoints renamed into
  ``<directory>/checkpoint_<iter>`` when whole, each with its report (``metrics.json``); kept:
  the latest and the ``keep`` best by ``val_ap`` (`pipeline.train.best`; the newest ``keep``
  when nothing is scored), as Ray Train keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.io import atomic_directory, remove_dead_writers
from pipeline.train.best import BestCheckpoint, best_of, rank
from pipeline.train.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


METRICS_FILE = "metrics.json"  # a local checkpoint's report (rank 0's metrics)
STAGING_PREFIX = "fpn-ckpt-"  # a Ray worker's checkpoint before Ray copies it: fpn-ckpt-<pid>-*


def checkpoint_dir_name(iteration: int) -> str:
    return f"checkpoint_{iteration:08d}"


def remove_orphan_staging(parent: str | Path | None = None) -> list[Path]:
    """Remove the checkpoint staging folders (``<temp dir>/fpn-ckpt-<pid>-*``) of dead processes.

    A worker killed between writing its checkpoint and Ray's copy of it leaves its staging folder
    behind (one checkpoint's size each time: a preempted node would fill its disk). Folders of
    live processes are left alone (`pipeline.io.remove_dead_writers`). Returns those removed.
    """
    removed = remove_dead_writers(Path(parent or tempfile.gettempdir()), STAGING_PREFIX)
    if removed:
        log.info("removed %d checkpoint staging folder(s) of killed workers", len(removed))
    return removed


class Session(Protocol):
    """What the loop needs from its runner."""

    rank: int
    world_size: int
    device: torch.device

    def restore(self) -> dict[str, Any] | None:
        """The latest checkpoint's state (see `pipeline.train.checkpoint`), or None for a fresh run."""
        ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, iteration: int) -> None:
        """Hand over metrics (every rank) and, from rank 0, a checkpoint state to keep."""
        ...

    def rows(self, name: str) -> Iterator[dict[str, Any]] | None:
        """The rows of this worker's Ray Dataset ``name`` (``train.loader: ray_data``), or None without one."""
        ...


class LocalSession:
    """One process, no Ray: checkpoints in ``directory``; the latest and the ``keep`` best kept."""

    def __init__(self, directory: str | Path, *, device: torch.device | None = None, keep: int = 2) -> None:
        self.rank = 0
        self.world_size = 1
        self.device = device or torch.device("cpu")
        self.directory = Path(directory)
        self.keep = keep
        self.reported: list[dict[str, float]] = []

    def checkpoints(self) -> list[Path]:
        """Whole checkpoint folders, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def restore(self) -> dict[str, Any] | None:
        for path in reversed(self.checkpoints()):
            try:
                return load_checkpoint(path)
            except CheckpointError as err:
                log.warning("skipping unreadable checkpoint: %s", err)
        return None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, iteration: int) -> None:
        self.reported.append(dict(metrics))
        if state is None:
            return
        with atomic_directory(self.directory / checkpoint_dir_name(iteration)) as tmp:
            save_checkpoint(tmp, state)
            (tmp / METRICS_FILE).write_text(json.dumps({"iteration": iteration, **metrics}) + "\n")
        # Ray Train's rule: all but the ``keep`` best go, the latest (just written) excepted.
        ranked = sorted(self.checkpoints(), key=lambda p: rank(self.metrics(p), int(p.name.split("_")[-1])))
        for old in ranked[: -self.keep]:
            if old.name != checkpoint_dir_name(iteration):
                shutil.rmtree(old, ignore_errors=True)

    def rows(self, name: str) -> Iterator[dict[str, Any]] | None:
        """No Ray Data in one process: the loop reads the shards through a DataLoader."""
        return None

    @staticmethod
    def metrics(checkpoint: Path) -> dict[str, Any]:
        """The report saved with ``checkpoint`` (``{}`` for one written without it)."""
        path = checkpoint / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def best(self) -> BestCheckpoint | None:
        """The best kept checkpoint by ``val_ap`` (`pipeline.train.best.best_of`); None if none was scored."""
        return best_of((str(p), self.metrics(p)) for p in self.checkpoints())


class RaySession:
    """Inside a Ray Train worker (``TorchTrainer`` has set up the process group)."""

    def __init__(self) -> None:
        # Ray is imported where it is used: the loop and `LocalSession` import this module in
        # processes that never start Ray (``--no-ray``, the GPU smoke script on a machine without Ray).
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory)

    def rows(self, name: str) -> Iterator[dict[str, Any]] | None:
        """``ray.train.get_dataset_shard(name)``'s rows, in order; None when the trainer was given no such dataset."""
        import ray.train

        try:
            shard = ray.train.get_dataset_shard(name)
        except (KeyError, ValueError):
            return None
        return None if shard is None else iter(shard.iter_rows())

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, iteration: int) -> None:
        import ray.train

        name = checkpoint_dir_name(iteration)
        if state is None:
            ray.train.report(metrics)
            return
        # Written whole in a temporary folder first; Ray copies it into the run's storage and
        # registers it only once the copy is done, so a crash leaves no half checkpoint behind.
        remove_orphan_staging()
        with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as tmp:
            save_checkpoint(tmp, state)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
