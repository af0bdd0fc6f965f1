"""Checks that run before any training work: bad params fail here with the key in the message.

`check_train_params` needs nothing but the params (and the local file system, for
``train.init_weights`` given as a path); `check_cluster` compares the request with what a Ray
cluster (or this machine) has, e.g. ``train.use_gpu: true, but the Ray cluster has no GPU``.
Every error is a `ConfigError` whose message starts with the key: ``train.num_workers: must be
>= 1, got 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.config import ConfigError, Params

AMP_MODES = ("bf16", "fp16", "off")
# Starting points that torchvision downloads; anything else is a path to a state dict.
DOWNLOADABLE_WEIGHTS = ("imagenet", "torchvision-coco")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"train.{key}: must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"train.{key}: must be > 0, got {value}")


def check_train_params(params: Params) -> None:
    """Raise `ConfigError` naming the first bad ``train.*`` key (and ``model.*`` keys it depends on)."""
    t = params.train
    _at_least("num_workers", t.num_workers, 1)
    _positive("cpus_per_worker", t.cpus_per_worker)
    _at_least("batch_size", t.batch_size, 1)
    _positive("lr", t.lr)
    _at_least("lr_reference_batch", t.lr_reference_batch, 1)
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    _at_least("weight_decay", t.weight_decay, 0.0)
    _at_least("iterations", t.iterations, 1)
    _at_least("warmup_iters", t.warmup_iters, 0)
    if not 0.0 < t.warmup_factor <= 1.0:
        raise ConfigError(f"train.warmup_factor: must be in (0, 1], got {t.warmup_factor}")
    previous = 0
    for step in t.lr_steps:
        if step <= previous:
            raise ConfigError(f"train.lr_steps: must be increasing iterations >= 1, got {list(t.lr_steps)}")
        previous = step
    if t.amp not in AMP_MODES:
        raise ConfigError(f"train.amp: must be one of {', '.join(AMP_MODES)}, got {t.amp!r}")
    if not 0.0 <= t.flip_prob <= 1.0:
        raise ConfigError(f"train.flip_prob: must be in [0, 1], got {t.flip_prob}")
    _at_least("loader_workers", t.loader_workers, 0)
    _at_least("checkpoint_every", t.checkpoint_every, 1)
    _at_least("max_failures", t.max_failures, -1)  # -1: retry forever (Ray's convention)
    _at_least("log_every", t.log_every, 1)
    _at_least("threads", t.threads, 0)
    if t.grad_clip_norm is not None:
        _positive("grad_clip_norm", t.grad_clip_norm)
    if not t.experiment.strip():
        raise ConfigError("train.experiment: must name an MLflow experiment, got an empty string")
    _check_init_weights(params)


def _check_init_weights(params: Params) -> None:
    value = params.train.init_weights
    if value is None:
        return
    if value == "torchvision-coco" and params.model.backbone != "resnet50":
        raise ConfigError(
            "train.init_weights: 'torchvision-coco' is fasterrcnn_resnet50_fpn's COCO weights and needs "
            f"model.backbone: resnet50, got {params.model.backbone!r}"
        )
    if value in DOWNLOADABLE_WEIGHTS:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"train.init_weights: {value!r} is neither one of {', '.join(DOWNLOADABLE_WEIGHTS)} nor an "
            "existing file (a torchvision state dict: fasterrcnn_resnet50_fpn COCO or an ImageNet ResNet)"
        )


def check_categories(params: Params, categories: list[dict], where: str) -> None:
    """``model.num_classes`` must equal the number of categories the data has."""
    if params.model.num_classes != len(categories):
        raise ConfigError(
            f"model.num_classes: {params.model.num_classes}, but {where} has {len(categories)} "
            "categories; set model.num_classes to match the data"
        )


def check_cluster(params: Params, resources: Mapping[str, float], where: str) -> None:
    """The workers must fit ``resources`` (``{"CPU": 2.0, "GPU": 0.0}`` of a Ray cluster or this machine).

    Ray would otherwise wait for resources forever instead of failing.
    """
    t = params.train
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 0.0))
    if t.use_gpu and gpus < 1:
        raise ConfigError(f"train.use_gpu: true, but {where} has no GPU; set train.use_gpu: false")
    if t.use_gpu and gpus < t.num_workers:
        raise ConfigError(
            f"train.num_workers: {t.num_workers} workers with one GPU each, but {where} has {gpus:g} GPUs"
        )
    needed = t.num_workers * t.cpus_per_worker
    if needed > cpus + 1e-9:
        raise ConfigError(
            f"train.cpus_per_worker: {t.num_workers} workers x {t.cpus_per_worker:g} CPUs = {needed:g} CPUs, "
            f"but {where} has {cpus:g}; lower train.cpus_per_worker or train.num_workers"
        )
