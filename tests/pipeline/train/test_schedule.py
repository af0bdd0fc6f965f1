"""The paper's schedule: lr scaled with the global batch, linear warm-up, x0.1 steps."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.train.schedule import build_optimizer, build_scheduler, lr_factor, scaled_lr


def test_lr_scales_linearly_with_the_global_batch() -> None:
    cfg = TrainConfig(lr=0.02, lr_reference_batch=16, batch_size=2)
    assert scaled_lr(cfg, world_size=8) == pytest.approx(0.02)  # the paper: 8 GPUs x 2 images
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.0025)
    assert scaled_lr(TrainConfig(lr=0.08, batch_size=4), world_size=1) == pytest.approx(0.02)


def test_warmup_then_steps() -> None:
    cfg = TrainConfig(warmup_iters=10, warmup_factor=0.001, lr_steps=(20, 30))
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(19, cfg) == 1.0
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(30, cfg) == pytest.approx(0.01)
    assert lr_factor(0, TrainConfig(warmup_iters=0)) == 1.0


def test_scheduler_drives_sgd_and_its_state_is_plain_data() -> None:
    cfg = TrainConfig(lr=0.16, batch_size=2, warmup_iters=2, warmup_factor=0.5, lr_steps=(3,))
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    opt = build_optimizer(model, cfg, world_size=1)
    assert len(opt.param_groups[0]["params"]) == 1, "frozen parameters are not optimised"
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.015, 0.02, 0.002, 0.002])
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None] and state["last_epoch"] == 5
