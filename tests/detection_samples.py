"""Test inputs for the evaluation tests: preprocessed splits in the layout `pipeline.dataset` reads, tiny model files.

Synthetic data goes through the real preprocess machinery. `preprocess_split` is a minimal
stand-in (resize, index.json with scales, categories.json, manifest.json) used for a few
coco-mini images: stage preprocess converts whole annotation files, and evaluating a subset
against the full original file also exercises COCOeval's restriction to the evaluated images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fpn import ModelConfig, build_detector
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.model_file import save_model_file
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


def _resized(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return round(width * scale), round(height * scale)


def preprocess_split(
    annotation_file: Path,
    image_folder: Path,
    out: Path,
    split: str,
    *,
    image_ids: list[int] | None = None,
    min_size: int = 128,
    max_size: int = 160,
) -> Path:
    """Write ``out/<split>/{images/<id>.jpg, index.json}``, ``out/categories.json`` and
    ``out/manifest.json`` from a COCO annotation file; returns ``out``."""
    coco = json.loads(annotation_file.read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    categories = [{"label": i + 1, "id": c["id"], "name": c["name"]} for i, c in enumerate(cats)]
    label_of = {c["id"]: c["label"] for c in categories}
    images = [img for img in coco["images"] if image_ids is None or img["id"] in image_ids]
    split_dir = out / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for img in images:
        width, height = _resized(img["width"], img["height"], min_size, max_size)
        sx, sy = width / img["width"], height / img["height"]
        with Image.open(image_folder / img["file_name"]) as original:
            original.convert("RGB").resize((width, height), Image.BILINEAR).save(
                split_dir / "images" / f"{img['id']}.jpg", quality=95
            )
        boxes, labels, crowd = [], [], []
        for ann in coco["annotations"]:
            if ann["image_id"] != img["id"]:
                continue
            x, y, w, h = ann["bbox"]
            box = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            if ann.get("iscrowd", 0):
                crowd.append(box)
            else:
                boxes.append(box)
                labels.append(label_of[ann["category_id"]])
        entries.append(
            {
                "image_id": img["id"],
                "file": f"images/{img['id']}.jpg",
                "orig_width": img["width"],
                "orig_height": img["height"],
                "width": width,
                "height": height,
                "scale_x": sx,
                "scale_y": sy,
                "boxes": boxes,
                "labels": labels,
                "crowd_boxes": crowd,
                "aspect_ratio": width / height,
            }
        )
    index = {"split": split, "annotation_file": str(annotation_file), "images": entries}
    (split_dir / "index.json").write_text(json.dumps(index))
    (out / "categories.json").write_text(json.dumps(categories))
    digest = hashlib.sha256((split_dir / "index.json").read_bytes() + (out / "categories.json").read_bytes())
    (out / "manifest.json").write_text(json.dumps({"data_hash": digest.hexdigest()}))
    return out


def synthetic_preprocessed(tmp: Path, *, images: int = 4, seed: int = 0) -> Path:
    """A few `pipeline.fetch.synthetic` images (COCO ids 2, 5, 9 -> labels 1..3, 200x160) through the real
    stage-preprocess machinery at the tiny model's sizes (128..160 px); returns the data root."""
    cfg = DataConfig(
        seed=seed,
        synthetic_train_images=1,
        synthetic_val_images=images,
        synthetic_width=200,
        synthetic_height=160,
    )
    generate_synthetic(cfg, tmp / "coco", progress=False)
    preprocess_dataset(
        tmp / "coco",
        tmp / "preprocessed",
        splits=("val2017",),
        min_size=TINY_MODEL["min_size"],
        max_size=TINY_MODEL["max_size"],
        cfg=PreprocessConfig(workers=1),
        progress=False,
    )
    return tmp / "preprocessed"


def coco_mini_preprocessed(shared_data: Path, tmp: Path, *, images: int = 4) -> Path:
    """The first ``images`` images of coco-mini's val2017 (real COCO, 80 categories) preprocessed to 128 px."""
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
