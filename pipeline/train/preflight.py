"""Checks that run before any training work: bad params fail here with the key in the message.

Each key's own range is checked when params are read (`pipeline.config`); here are the checks
that need another section or the file system (``train.init_weights`` given as a path, the data's
categories). Whether the workers fit a cluster is `pipeline.cluster.check_fits`. Every error is a `ConfigError` whose message starts with the key: ``train.num_workers: must be
>= 1, got 0``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError, Params

# Starting points that torchvision downloads; anything else is a path to a state dict.
DOWNLOADABLE_WEIGHTS = ("imagenet", "torchvision-coco")


def check_train_params(params: Params) -> None:
    """Raise `ConfigError` for ``train.*`` values that depend on another section or on files.

    Each key's own range is checked where the params are read (`pipeline.config.TrainConfig`).
    """
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


def check_num_classes(params: Params, categories: list[dict], where: str) -> None:
    """``model.num_classes`` must equal the number of categories the data has."""
    if params.model.num_classes != len(categories):
        raise ConfigError(
            f"model.num_classes: {params.model.num_classes}, but {where} has {len(categories)} "
            "categories; set model.num_classes to match the data"
        )
