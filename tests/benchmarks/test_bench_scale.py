"""benchmarks/coco_shaped.py's shape, and benchmarks/bench_scale.py end to end at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from benchmarks.coco_shaped import COCO_CATEGORIES, DONE_MARKER, draw_image, generate_coco_shaped

REPO_ROOT = Path(__file__).resolve().parents[2]
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_coco_shaped_has_cocos_shape(tmp_path: Path) -> None:
    out = generate_coco_shaped(
        tmp_path / "cs", train_images=600, val_images=40, seed=3, workers=2, progress=False
    )
    train = COCO(str(out / "annotations" / "instances_train2017.json"))  # pycocotools reads it
    category_ids = set(train.getCatIds())
    assert category_ids == set(range(1, 91)) - COCO_GAPS
    assert {c["name"] for c in train.loadCats(train.getCatIds())} == set(COCO_CATEGORIES.values())
    annotations = train.dataset["annotations"]
    assert 6.5 < len(annotations) / 600 < 8.1  # COCO: 7.3 boxes per image
    per_image = Counter(a["image_id"] for a in annotations)
    assert 0 < 600 - len(per_image) < 30  # about 1% empty
    crowd = sum(a["iscrowd"] for a in annotations)
    assert 0 < crowd < 0.03 * len(annotations)
    assert {a["category_id"] for a in annotations} <= category_ids
    assert len({a["id"] for a in annotations}) == len(annotations)
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        image = train.imgs[ann["image_id"]]
        assert min(x, y) >= 0 and x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01
        assert ann["area"] == pytest.approx(w * h, rel=0.01, abs=0.02)
    sizes = Counter((i["width"], i["height"]) for i in train.dataset["images"])
    assert set(sizes) == {(64, 48), (48, 64)}
    val = COCO(str(out / "annotations" / "instances_val2017.json"))
    assert len(val.getImgIds()) == 40 and not set(val.getImgIds()) & set(train.getImgIds())
    assert all((out / "train2017" / i["file_name"]).is_file() for i in train.dataset["images"])
    assert json.loads((out / DONE_MARKER).read_text())["annotations"]["train2017"] == len(annotations)


def test_coco_shaped_is_deterministic_and_refuses_an_existing_folder(tmp_path: Path) -> None:
    assert draw_image(7, 0, 5) == draw_image(7, 0, 5)
    assert draw_image(7, 0, 5) != draw_image(7, 0, 6)
    a = generate_coco_shaped(tmp_path / "a", train_images=20, val_images=5, seed=1, workers=1, progress=False)
    b = generate_coco_shaped(tmp_path / "b", train_images=20, val_images=5, seed=1, workers=2, progress=False)
    for name in ("annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with pytest.raises(FileExistsError):
        generate_coco_shaped(a, train_images=1, val_images=1, progress=False)
    with pytest.raises(ValueError):
        generate_coco_shaped(tmp_path / "c", train_images=0, val_images=1, progress=False)


@pytest.mark.slow
def test_bench_scale_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "bench_scale.py"), "--sizes", "60",
        "--work-dir", str(tmp_path / "work"), "--out", str(out), "--loader-workers", "2",
        "--detections", "20", "--proposals", "100", "--generate-workers", "1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| train images | 60 |" in done.stdout and "date:" in done.stdout
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["ram_gib"] > 0 and report["date"]
    (size,) = report["sizes"]
    assert size["train_images"] == 60 and size["val_images"] == 60
    for step in ("fetch", "preprocess"):
        assert size[step]["seconds"] > 0 and size[step]["peak_rss_mib"] > 0
    assert size["preprocess"]["peak_tree_rss_mib"] >= size["preprocess"]["peak_rss_mib"]
    # today's format: one JPEG per image; a sharded format would show shard files instead
    assert size["output"]["files"] >= 1 and size["output"]["image_files"] + size["output"]["shard_files"] >= 1
    assert size["index"]["seconds"] > 0 and size["index"]["tracemalloc_peak_mib"] > 0
    loader = size["loader"]
    assert loader["dataset_images"] == 60 and loader["images_timed"] > 0 and loader["images_per_s"] > 0
    for moment in ("start", "end"):
        assert len(loader[moment]["workers"]) == 2
        assert all(w["pss_mib"] > 0 and w["uss_mib"] > 0 for w in loader[moment]["workers"])
    assert size["dvc"]["add_seconds"] > 0 and size["dvc"]["status_seconds"] > 0
    evaluation = size["eval"]
    assert evaluation["images"] == 60 and evaluation["detections_per_image"] == 20
    for part in ("detections", "proposals"):
        assert evaluation[part]["seconds"] > 0 and evaluation[part]["peak_rss_growth_mib"] >= 0
    assert 0 <= evaluation["detections"]["AP"] <= 1 and 0 <= evaluation["proposals"]["AR1k"] <= 1
