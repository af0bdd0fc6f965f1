"""Stage preprocess end to end on real COCO (coco-mini): original bytes, shards, boxes, crowd, labels, Ray, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import PreprocessConfig
from pipeline.dataset import read_index
from pipeline.preprocess import stage
from pipeline.preprocess.prepare_image import ImageResult, ImageSpec, ImageTask, prepare_chunk
from pipeline.preprocess.stage import preprocess_dataset
from stages.preprocess import main
from tests.params_files import write_params_file

IMAGES_PER_SHARD = 30  # coco-mini's 80 val images: 3 shards


def params(tmp_path: Path, **preprocess: object) -> str:
    raw = {"preprocess": {"workers": 2, "images_per_shard": IMAGES_PER_SHARD, **preprocess}}
    return str(write_params_file(tmp_path / "params.yaml", raw))


@pytest.fixture(scope="module")
def coco_mini(shared_data: Path) -> Path:
    return shared_data / "coco-mini"


@pytest.fixture(scope="module")
def preprocessed(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("stage-preprocess")
    out = base / "pre"
    assert main(["--params", params(base), "--coco", str(coco_mini), "--out", str(out)]) == 0
    return out


def test_real_coco_keeps_its_bytes_and_boxes_in_original_pixels(preprocessed: Path, coco_mini: Path) -> None:
    coco = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
    index = read_index(preprocessed, "val2017")
    assert index.annotation_file == str(coco_mini / "annotations" / "instances_val2017.json")
    assert len(index) == 80 and len(index.shard_files) == math.ceil(80 / IMAGES_PER_SHARD)
    images = {image["id"]: image for image in coco["images"]}
    categories = json.loads((preprocessed / "categories.json").read_text())
    label_of = {c["id"]: c["label"] for c in categories}
    assert len(categories) == 80 and max(label_of) == 90 and sorted(label_of.values()) == list(range(1, 81))
    rows = [row for name in index.shard_files for row in pq.read_table(Path(index.folder) / name).to_pylist()]
    assert (
        [row["image_id"] for row in rows]
        == index.image_ids.tolist()
        == [image["id"] for image in coco["images"]]
    )
    for row, width, height in zip(rows, index.widths.tolist(), index.heights.tolist(), strict=True):
        image = images[row["image_id"]]
        assert (row["width"], row["height"]) == (width, height) == (image["width"], image["height"])
        assert row["image"] == (coco_mini / "val2017" / image["file_name"]).read_bytes()  # byte for byte
        assert row["file"] == image["file_name"]
        anns = [a for a in coco["annotations"] if a["image_id"] == row["image_id"]]
        plain = [a for a in anns if not a["iscrowd"]]
        assert len(row["boxes"]) == 4 * len(plain) and len(row["crowd_boxes"]) == 4 * (len(anns) - len(plain))
        for k, ann in enumerate(plain):
            x, y, bw, bh = ann["bbox"]
            clipped = [x, y, min(x + bw, width), min(y + bh, height)]
            assert row["boxes"][4 * k : 4 * k + 4] == pytest.approx(clipped, abs=1e-3)  # float32
            assert row["labels"][k] == label_of[ann["category_id"]]
    assert int((index.aspect_ratios < 1).sum()) == 16
    report = json.loads((preprocessed / "report.json").read_text())
    assert (
        report["counts"]["val2017"]["crowd_boxes"] == 11 and report["counts"]["train2017"]["crowd_boxes"] == 1
    )
    assert (
        report["counts"]["val2017"]["images_skipped"] == 0
        and report["counts"]["val2017"]["images_converted"] == 0
        and report["counts"]["train2017"]["images_written"] == 16
    )


def test_ray_tasks_give_the_same_output(preprocessed: Path, coco_mini: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = preprocess_dataset(
            coco_mini, tmp_path / "pre", splits=("train2017", "val2017"),
            cfg=PreprocessConfig(use_ray=True, images_per_shard=IMAGES_PER_SHARD), progress=False,
        )  # fmt: skip
    finally:
        ray.shutdown()
    expected = json.loads((preprocessed / "manifest.json").read_text())["data_hash"]
    assert summary.data_hash == expected


def test_malformed_json_exits_1_naming_the_file(coco_mini: Path, tmp_path: Path, repo_root: Path) -> None:
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").symlink_to(coco_mini / "val2017")
    (coco / "train2017").symlink_to(coco_mini / "train2017")
    (coco / "annotations" / "instances_train2017.json").write_bytes(
        (coco_mini / "annotations" / "instances_train2017.json").read_bytes()
    )
    broken = coco / "annotations" / "instances_val2017.json"
    broken.write_text(
        (coco_mini / "annotations" / "instances_val2017.json").read_text()[:5000]
    )  # cut mid-file
    result = subprocess.run(
        [sys.executable, "-m", "stages.preprocess", "--params", params(tmp_path), "--coco", str(coco),
         "--out", str(tmp_path / "pre")],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"error: {broken}: not valid JSON" in result.stderr
    assert not (tmp_path / "pre").exists()


def killed_on_5001(tasks: list[ImageTask], spec: ImageSpec) -> list[ImageResult]:
    """`prepare_chunk`, except that the worker given val2017/000000005001.jpg is killed (SIGKILL)."""
    if any(task.file.endswith("000000005001.jpg") for task in tasks):
        os.kill(os.getpid(), signal.SIGKILL)
    return prepare_chunk(tasks, spec)


def test_a_killed_worker_exits_1_naming_the_images_and_the_rerun(
    coco_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It was a bare BrokenProcessPool traceback; a crash is no bad input: exit 1, one line."""
    monkeypatch.setattr(stage, "prepare_chunk", killed_on_5001)
    out = tmp_path / "pre"
    assert main(["--params", params(tmp_path), "--coco", str(coco_mini), "--out", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(
        f"stages.preprocess: error: {coco_mini / 'annotations' / 'instances_val2017.json'}: "
    )
    assert "a preprocess worker died" in line and "000000005001.jpg" in line
    assert "Rerun with preprocess.workers: 1" in line
    assert not out.exists()
