"""The paper's optimisation recipe: SGD with momentum, linear warm-up, step decay.

FPN paper, Sec. 5.1 / Detectron's 1x schedule: SGD, momentum 0.9, weight decay 1e-4,
lr 0.02 for a minibatch of 16 images (8 GPUs x 2), divided by 10 at 60k and 80k of 90k
iterations. The learning rate scales linearly with the global batch (Goyal et al., 2017),
with a linear warm-up from ``warmup_factor * lr`` over ``warmup_iters`` iterations.
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from pipeline.config import TrainConfig


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """``cfg.lr`` is for ``cfg.lr_reference_batch`` images per step; scale to the global batch."""
    global_batch = cfg.batch_size * world_size
    return cfg.lr * global_batch / cfg.lr_reference_batch


def lr_factor(iteration: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr for the step after ``iteration`` steps are done.

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, then x0.1 at each of
    ``lr_steps``.
    """
    decay = 0.1 ** bisect_right(list(cfg.lr_steps), iteration)
    if iteration >= cfg.warmup_iters:
        return decay
    alpha = iteration / cfg.warmup_iters
    return decay * (cfg.warmup_factor * (1.0 - alpha) + alpha)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, world_size: int) -> torch.optim.SGD:
    """SGD over the trainable parameters (frozen stages have ``requires_grad=False``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        trainable, lr=scaled_lr(cfg, world_size), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimizer step).

    A plain function as the lambda keeps the scheduler's state dict plain data (a
    ``weights_only`` checkpoint can hold it).
    """

    def factor(iteration: int) -> float:
        return lr_factor(iteration, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scaled_lr_steps(train: TrainConfig, iterations: int) -> tuple[int, ...]:
    """``train.lr_steps`` at the same fractions of a run of ``iterations`` steps (a shorter or
    longer run keeps the schedule's shape); steps that fall on or past the end, or onto an
    earlier one, are dropped."""
    factor = iterations / train.iterations
    steps: list[int] = []
    for step in train.lr_steps:
        scaled = max(1, round(step * factor))
        if scaled < iterations and (not steps or scaled > steps[-1]):
            steps.append(scaled)
    return tuple(steps)
