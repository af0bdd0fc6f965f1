"""pipeline.fetch.synthetic: deterministic, valid COCO, and the object statistics the quickstart relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.config import DataConfig
from pipeline.fetch.synthetic import CATEGORIES, generate_synthetic

CFG = DataConfig(synthetic_train_images=60, synthetic_val_images=8, seed=3)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(CFG, out, progress=False)
    return out


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(generated: Path, tmp_path: Path) -> None:
    generate_synthetic(CFG, tmp_path / "again", progress=False)
    assert files_of(tmp_path / "again") == files_of(generated)
    other = DataConfig(synthetic_train_images=60, synthetic_val_images=8, seed=4)
    generate_synthetic(other, tmp_path / "other", progress=False)
    assert (
        files_of(tmp_path / "other")["train2017/000000000001.jpg"]
        != files_of(generated)["train2017/000000000001.jpg"]
    )


def test_valid_coco_loaded_by_pycocotools(generated: Path) -> None:
    for split, count in (("train2017", 60), ("val2017", 8)):
        path = generated / "annotations" / f"instances_{split}.json"
        raw = json.loads(path.read_text())
        assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()
        coco = COCO(str(path))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == [c["id"] for c in CATEGORIES] == [2, 5, 9]  # not 1..3
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(generated / split / image["file_name"]) as img:
                assert img.size == (image["width"], image["height"]) == (320, 256) and img.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 320 and y + h <= 256 and ann["iscrowd"] == 0
            assert 0 < ann["area"] <= w * h + 1e-6
            assert coco.annToMask(ann).sum() > 0


def test_scales_counts_and_empty_images(generated: Path) -> None:
    coco = json.loads((generated / "annotations" / "instances_train2017.json").read_text())
    sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=61)[1:]
    assert sides.min() < 10 and sides.max() > 100  # ~8 px up to most of the image
    assert (sides < 24).mean() > 0.35  # many small objects: they need the fine pyramid levels
    assert (per_image == 0).any() and per_image.max() >= 5  # some empty images, several objects in others
    assert {a["category_id"] for a in coco["annotations"]} == {2, 5, 9}


@pytest.mark.parametrize(
    ("width", "height"),
    [(64, 64), (64, 400), (400, 64), (85, 85), (86, 86), (127, 127), (128, 128)],
)
def test_every_accepted_size_generates_shapes_inside_the_image(
    width: int, height: int, tmp_path: Path
) -> None:
    """Sides from the smallest accepted (64) up: below ~86 px the large-object band has no room."""
    cfg = DataConfig(synthetic_train_images=12, synthetic_val_images=1, synthetic_width=width,
                     synthetic_height=height)  # fmt: skip
    generate_synthetic(cfg, tmp_path, progress=False)
    coco = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert coco["annotations"], "12 images hold some shapes"
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert min(x, y) >= 0 and x + w <= width and y + h <= height
        assert max(w, h) <= 0.75 * min(width, height) + 0.01
