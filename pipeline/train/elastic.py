"""Elastic training: a run that continues on another number of workers.

With ``train.min_workers`` Ray Train runs between ``min_workers`` and ``num_workers`` workers
(``ScalingConfig(num_workers=(min, max))``): after a node is lost it restarts the worker group
from the latest checkpoint with the workers that fit, and grows again when nodes join (at its
next resize check). A checkpoint records the world size that wrote it (``progress.world_size``);
`adapt_to_world_size` adapts a restored state to the new one:

* **The lr follows the global batch** (``train.batch_size`` x workers, the linear scaling rule
  of Goyal et al. that `pipeline.train.schedule.scaled_lr` applies at the start): each
  parameter group's base lr is rescaled, the schedule (warm-up, ``lr_steps``) stays in
  iterations. ``train.iterations`` still counts steps, so a run that shrank sees fewer images.
* **The position in the epoch.** Every rank takes every ``world_size``-th batch of one global,
  seeded list per epoch (`pipeline.dataset.GroupedBatchSampler`), so ``k`` steps on ``w`` workers
  consumed ``k * w`` of the epoch's batches; on ``w'`` workers the epoch goes on at step
  ``ceil(k * w / w')``: nothing repeated, fewer than ``w'`` batches skipped.

Momentum buffers carry over unchanged (they are per parameter, not per worker).
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline.config import TrainConfig
from pipeline.train.checkpoint import Progress
from pipeline.train.schedule import scaled_lr

log = logging.getLogger(__name__)


def adapt_to_world_size(
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    world_size: int,
) -> None:
    """Rescale the lr and move the epoch position of a state restored from another world size.

    No-op when ``progress.world_size`` is ``world_size`` or unknown (0). Sets ``progress.world_size``.
    """
    previous = progress.world_size
    progress.world_size = world_size
    if previous in (0, world_size):
        return
    base = scaled_lr(cfg, world_size)
    for group in optimizer.param_groups:
        group["initial_lr"] = base
    scheduler.base_lrs = [base for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = base * factor
    consumed = progress.batch_in_epoch * previous
    progress.batch_in_epoch = math.ceil(consumed / world_size)
    log.warning(
        "[train] resumed on %d workers (the checkpoint's run had %d): lr %.4g for the global batch of %d, "
        "epoch %d continues at batch %d",
        world_size, previous, base * factor, cfg.batch_size * world_size, progress.epoch, progress.batch_in_epoch,
    )  # fmt: skip
