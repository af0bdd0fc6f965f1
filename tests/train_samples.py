"""Inputs for the training tests: tiny synthetic data run through the real preprocess, tiny params.

`tiny_data` draws `pipeline.fetch.synthetic` images and preprocesses them with
`pipeline.preprocess.stage.preprocess_dataset` into the layout `pipeline.dataset` reads; `tiny_params` is a
ResNet-18-FPN with d=32 resizing the 160x128 images to 120x96 itself that takes well under a second a step on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset
from tests.params_files import write_params_file

TINY_MODEL: dict[str, Any] = {
    "backbone": "resnet18",
    "norm": "gn",
    "trainable_stages": 5,
    "fpn_channels": 32,
    "representation_size": 64,
    "min_size": 96,
    "max_size": 120,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_batch_per_image": 64,
    "rpn_pre_nms_topk_train": 300,
    "rpn_post_nms_topk_train": 100,
    "rpn_pre_nms_topk_test": 300,
    "rpn_post_nms_topk_test": 100,
    "roi_batch_per_image": 32,
    "num_classes": 3,
}
TINY_TRAIN: dict[str, Any] = {
    "num_workers": 1,
    "cpus_per_worker": 1,
    "batch_size": 2,
    "lr": 0.08,
    "iterations": 6,
    "warmup_iters": 2,
    "lr_steps": [],
    "checkpoint_every": 3,
    "log_every": 2,
    "threads": 1,
}


def tiny_data(
    root: Path,
    *,
    train_images: int = 12,
    val_images: int = 4,
    width: int = 160,
    height: int = 128,
    seed: int = 0,
) -> Path:
    """``root/coco`` (synthetic COCO layout) preprocessed into ``root/preprocessed``; returns the latter."""
    data = DataConfig(
        seed=seed,
        synthetic_train_images=train_images,
        synthetic_val_images=val_images,
        synthetic_width=width,
        synthetic_height=height,
    )
    generate_synthetic(data, root / "coco", progress=False)
    preprocess_dataset(
        root / "coco",
        root / "preprocessed",
        splits=(data.train_split, data.val_split),
        cfg=PreprocessConfig(workers=1),
        progress=False,
    )
    return root / "preprocessed"


def tiny_params(model: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    """Raw params (as params.yaml holds them) with `TINY_MODEL` and `TINY_TRAIN` updated by the arguments."""
    return {"model": {**TINY_MODEL, **(model or {})}, "train": {**TINY_TRAIN, **train}}


def write_params(path: Path, raw: dict[str, Any]) -> Path:
    """``raw`` as a params file (the sections it lacks written empty: their defaults); returns ``path``."""
    return write_params_file(path, raw)
