"""Test inputs for the evaluation tests: preprocessed splits in the layout `pipeline.dataset` reads, tiny model files.

Synthetic data goes through the real preprocess machinery. `preprocess_split` writes a few
coco-mini images with the real per-image and shard-writing code (not the stage: stage preprocess
converts whole annotation files, and evaluating a subset against the full original file also
exercises COCOeval's restriction to the evaluated images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fpn import ModelConfig, build_detector
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.dataset import files_sha256
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.model_file import save_model_file
from pipeline.preprocess.prepare_image import ImageSpec, ImageTask, ObjectBox, prepare_image
from pipeline.preprocess.shards import SplitWriter
from pipeline.preprocess.stage import preprocess_dataset

# ResNet-18-FPN small enough to run a few images in seconds on 2 shared cores. box_score_thresh 0
# keeps the (random) detections, so the mapping and COCOeval paths see boxes.
TINY_MODEL = {
    "backbone": "resnet18",
    "norm": "gn",
    "trainable_stages": 5,
    "fpn_channels": 32,
    "representation_size": 64,
    "min_size": 128,
    "max_size": 160,
    "anchor_sizes": (16, 32, 64, 128, 256),
    "box_score_thresh": 0.0,
    "detections_per_image": 50,
}


def preprocess_split(
    annotation_file: Path,
    image_folder: Path,
    out: Path,
    split: str,
    *,
    image_ids: list[int] | None = None,
    images_per_shard: int = 2,
) -> Path:
    """Write ``out/<split>`` (shards, index, split.json), ``out/categories.json`` and ``out/manifest.json``
    for some images of a COCO annotation file, with the real per-image and shard-writing code; returns ``out``."""
    coco = json.loads(annotation_file.read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    categories = [{"label": i + 1, "id": c["id"], "name": c["name"]} for i, c in enumerate(cats)]
    label_of = {c["id"]: c["label"] for c in categories}
    writer = SplitWriter(
        out / split, split=split, annotation_file=str(annotation_file), images_per_shard=images_per_shard
    )
    for img in coco["images"]:
        if image_ids is not None and img["id"] not in image_ids:
            continue
        objects = tuple(
            ObjectBox(*ann["bbox"], label_of[ann["category_id"]], bool(ann.get("iscrowd", 0)))
            for ann in coco["annotations"]
            if ann["image_id"] == img["id"]
        )
        path = image_folder / img["file_name"]
        task = ImageTask(img["id"], str(path), path.read_bytes(), objects, (img["width"], img["height"]))
        result = prepare_image(task, ImageSpec())
        assert result.row is not None, result.problems
        writer.add(result.row)
    files = writer.close()
    (out / "categories.json").write_text(json.dumps(categories))
    data_hash = files_sha256([*files, out / "categories.json"])
    (out / "manifest.json").write_text(json.dumps({"data_hash": data_hash}))
    return out


def synthetic_preprocessed(
    tmp: Path, *, images: int = 4, seed: int = 0, width: int = 200, height: int = 160
) -> Path:
    """A few `pipeline.fetch.synthetic` images (COCO ids 2, 5, 9 -> labels 1..3, ``width`` x ``height``) through
    the real stage-preprocess machinery (the tiny model resizes them to 128..160 px itself); returns the data root."""
    cfg = DataConfig(
        seed=seed,
        synthetic_train_images=1,
        synthetic_val_images=images,
        synthetic_width=width,
        synthetic_height=height,
    )
    generate_synthetic(cfg, tmp / "coco", progress=False)
    preprocess_dataset(
        tmp / "coco",
        tmp / "preprocessed",
        splits=("val2017",),
        cfg=PreprocessConfig(workers=1),
        progress=False,
    )
    return tmp / "preprocessed"


def coco_mini_preprocessed(shared_data: Path, tmp: Path, *, images: int = 4) -> Path:
    """The first ``images`` images of coco-mini's val2017 (real COCO, 80 categories, original sizes) preprocessed."""
    root = shared_data / "coco-mini"
    annotation_file = root / "annotations" / "instances_val2017.json"
    ids = [img["id"] for img in json.loads(annotation_file.read_text())["images"][:images]]
    return preprocess_split(annotation_file, root / "val2017", tmp / "preprocessed", "val2017", image_ids=ids)


def tiny_model_file(
    path: Path, categories: list[dict[str, Any]], *, extra: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """Save a randomly initialised tiny detector for ``categories`` as a model file."""
    cfg = ModelConfig.from_dict({**TINY_MODEL, "num_classes": len(categories)})
    torch.manual_seed(seed)
    save_model_file(path, build_detector(cfg), cfg, categories, extra or {})
    return path


def read_categories(root: Path) -> list[dict[str, Any]]:
    return json.loads((root / "categories.json").read_text())


# The profiling tests' model: ResNet-18-FPN at 128/160 with small proposal budgets.
TINY_PROFILE_CONFIG = ModelConfig(
    backbone="resnet18",
    norm="gn",
    trainable_stages=5,
    fpn_channels=32,
    representation_size=64,
    min_size=128,
    max_size=160,
    anchor_sizes=(16, 32, 64, 128, 256),
    num_classes=3,
    rpn_pre_nms_topk_test=300,
    rpn_post_nms_topk_test=100,
    rpn_pre_nms_topk_train=300,
    rpn_post_nms_topk_train=100,
    roi_batch_per_image=32,
)
