"""Stage preprocess with ``--out s3://...``: built locally, uploaded with its completion markers last,
read back by the training readers from the bucket (a real S3 API: ``moto_server``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.dataset import DetectionDataset, read_categories, read_data_hash, read_index
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.io import OUTPUT_MARKER, OutputError
from pipeline.preprocess.stage import preprocess_dataset
from pipeline.storage import upload_order


def test_the_markers_of_completeness_go_last() -> None:
    files = [
        "manifest.json",
        "val/split.json",
        "val/shard-00000.parquet",
        "categories.json",
        "a/x",
        "val/index.parquet",
    ]
    last = ["val/split.json", "train/split.json", "categories.json", "manifest.json"]
    assert upload_order(files, last) == [
        "a/x", "val/index.parquet", "val/shard-00000.parquet", "val/split.json", "categories.json", "manifest.json",
    ]  # fmt: skip


def test_preprocess_into_a_bucket_reads_back_like_the_folder(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    data = DataConfig(
        synthetic_train_images=6, synthetic_val_images=3, synthetic_width=96, synthetic_height=80
    )
    generate_synthetic(data, tmp_path / "coco", progress=False)
    splits, cfg = (data.train_split, data.val_split), PreprocessConfig(workers=1, images_per_shard=4)
    out = f"s3://{s3_server.bucket}/pp/preprocessed"
    summary = preprocess_dataset(tmp_path / "coco", out, splits=splits, cfg=cfg, progress=False)
    local = tmp_path / "local"
    preprocess_dataset(tmp_path / "coco", local, splits=splits, cfg=cfg, progress=False)

    keys = s3_server.keys("pp/preprocessed/")
    assert f"pp/preprocessed/{OUTPUT_MARKER}" in keys and "pp/preprocessed/manifest.json" in keys
    assert read_data_hash(out) == summary.data_hash == read_data_hash(local)
    assert read_categories(out) == read_categories(local)
    index = read_index(out, data.train_split)
    assert index.folder == f"{out}/{data.train_split}" and len(index.shard_files) == 2
    remote, here = (
        DetectionDataset(out, data.train_split, train=False),
        DetectionDataset(local, data.train_split, train=False),
    )
    for i in range(len(here)):
        (a, ta), (b, tb) = remote[i], here[i]
        assert a.equal(b) and ta["boxes"].equal(tb["boxes"]) and ta["image_id"] == tb["image_id"]

    # Again into the same prefix: ours, so allowed. A prefix holding someone else's objects: refused.
    preprocess_dataset(tmp_path / "coco", out, splits=splits, cfg=cfg, progress=False)
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="theirs/notes.txt", Body=b"keep me")
    with pytest.raises(
        OutputError, match=r"s3://.*/theirs: not writing over objects that stage preprocess did not write"
    ):
        preprocess_dataset(
            tmp_path / "coco", f"s3://{s3_server.bucket}/theirs", splits=splits, cfg=cfg, progress=False
        )
    assert s3_server.read("theirs/notes.txt") == b"keep me"
