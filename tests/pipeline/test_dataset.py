"""pipeline.dataset over a real preprocessed output: the index, shard reads, items, flip, collate, grouped DDP sampling."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.dataset import (
    DatasetError,
    DetectionDataset,
    GroupedBatchSampler,
    collate,
    hflip,
    read_categories,
    read_data_hash,
    read_index,
    to_model_input,
)
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dataset")
    cfg = DataConfig(synthetic_train_images=24, synthetic_val_images=4, seed=1)
    generate_synthetic(cfg, base / "coco", progress=False)
    preprocess_dataset(
        base / "coco", base / "pre", splits=("train2017", "val2017"),
        cfg=PreprocessConfig(workers=1, images_per_shard=10), progress=False,
    )  # fmt: skip
    return base / "pre"


def shard_rows(root: Path, split: str) -> list[dict[str, Any]]:
    index = read_index(root, split)
    return [row for name in index.shard_files for row in pq.read_table(Path(index.folder) / name).to_pylist()]


def test_items_follow_the_shards(root: Path) -> None:
    dataset = DetectionDataset(root, "train2017", train=False)
    rows = shard_rows(root, "train2017")
    assert len(dataset) == len(rows) == 24
    for i in (0, 5, 23):
        image, target = dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 256, 320)  # stored at the original size
        assert target["image_id"] == rows[i]["image_id"]
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert torch.equal(target["boxes"], torch.tensor(rows[i]["boxes"]).reshape(-1, 4))
        assert set(target["labels"].tolist()) <= {1, 2, 3}
        decoded = np.asarray(Image.open(io.BytesIO(rows[i]["image"])).convert("RGB"))
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - decoded).max() <= 2  # the same JPEG


def test_the_index_is_a_few_bytes_per_image(root: Path) -> None:
    index = read_index(root, "train2017")
    arrays = (index.image_ids, index.widths, index.heights, index.shards, index.rows, index.num_boxes)
    assert all(isinstance(a, np.ndarray) and len(a) == 24 for a in arrays)
    assert sum(a.nbytes for a in arrays) / len(index) <= 32  # 118k COCO images: under 4 MB
    assert index.shard_files == ("shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet")
    assert np.allclose(index.aspect_ratios, 320 / 256)


def test_random_access_gives_what_sequential_reading_gives(root: Path) -> None:
    sequential = DetectionDataset(root, "train2017", train=False)
    in_order = [sequential[i] for i in range(len(sequential))]
    shuffled = DetectionDataset(root, "train2017", train=False)
    for i in np.random.default_rng(0).permutation(len(shuffled)).tolist():
        image, target = shuffled[i]
        assert torch.equal(image, in_order[i][0]) and torch.equal(target["boxes"], in_order[i][1]["boxes"])
        assert target["image_id"] == in_order[i][1]["image_id"]
    copied = pickle.loads(pickle.dumps(shuffled))  # as DataLoader and Ray workers get it: no open files
    assert torch.equal(copied[7][0], in_order[7][0])


def test_empty_image_gives_empty_target(root: Path) -> None:
    dataset = DetectionDataset(root, "train2017", train=True)
    empty = np.flatnonzero(dataset.index.num_boxes == 0).tolist()
    assert empty, "the synthetic set should contain an image without objects at this seed"
    _, target = dataset[empty[0]]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_flip_mirrors_image_and_boxes(root: Path) -> None:
    plain, plain_target = DetectionDataset(root, "train2017", train=False)[1]
    flipped, flipped_target = DetectionDataset(root, "train2017", train=True, flip_prob=1.0)[1]
    assert torch.equal(flipped, plain.flip(-1))
    x1, y1, x2, y2 = plain_target["boxes"].unbind(1)
    expected = torch.stack([320 - x2, y1, 320 - x1, y2], 1)
    assert torch.allclose(flipped_target["boxes"], expected)
    image, boxes = hflip(*hflip(plain, plain_target["boxes"]))
    assert torch.equal(image, plain) and torch.allclose(boxes, plain_target["boxes"])
    never, _ = DetectionDataset(root, "train2017", train=True, flip_prob=0.0)[1]
    assert torch.equal(never, plain)


def test_dataloader_with_grouped_sampler_and_collate(root: Path) -> None:
    dataset = DetectionDataset(root, "train2017", train=True)
    sampler = GroupedBatchSampler(dataset, 4, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(sampler) == 6
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 4


def test_sampler_groups_orientations_and_shards_ranks() -> None:
    ratios = [1.5, 0.7, 1.0, 0.6, 1.33, 0.75, 1.2, 1.8, 0.5, 1.1, 0.9]  # 7 landscape, 4 portrait
    per_rank = [
        list(GroupedBatchSampler(ratios, 2, shuffle=True, seed=5, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert (
        len(per_rank[0])
        == len(per_rank[1])
        == len(GroupedBatchSampler(ratios, 2, shuffle=True, seed=5, world_size=2))
    )
    for batch in per_rank[0] + per_rank[1]:
        assert len({ratios[i] >= 1 for i in batch}) == 1  # one orientation per batch
    covered = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert set(covered) == set(range(len(ratios)))  # every index on some rank (padding may repeat)


def test_sampler_is_deterministic_per_epoch() -> None:
    ratios = [1.3] * 20
    a = GroupedBatchSampler(ratios, 3, shuffle=True, seed=7)
    b = GroupedBatchSampler(ratios, 3, shuffle=True, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    ordered = list(GroupedBatchSampler(ratios, 3, shuffle=False, seed=7))
    assert [i for batch in ordered for i in batch] == list(range(20))
    assert [len(batch) for batch in ordered] == [3] * 6 + [2]


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler([1.0], 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler([1.0], 1, shuffle=False, seed=0, rank=2, world_size=2)


def test_readers_and_missing_files(root: Path, tmp_path: Path) -> None:
    assert [c["id"] for c in read_categories(root)] == [2, 5, 9]
    assert len(read_data_hash(root)) == 64
    with pytest.raises(DatasetError, match=rf"{tmp_path}/val2017/split\.json: not found"):
        DetectionDataset(tmp_path, "val2017", train=False)
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        read_data_hash(tmp_path)


@pytest.fixture
def copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "pre")
    return tmp_path / "pre"


def test_a_missing_shard_is_named(copy: Path) -> None:
    (copy / "train2017" / "shard-00001.parquet").unlink()
    with pytest.raises(DatasetError, match=rf"{copy}/train2017/shard-00001\.parquet: shard not found"):
        DetectionDataset(copy, "train2017", train=False)


def test_a_corrupt_shard_is_named_when_read(copy: Path) -> None:
    shard = copy / "train2017" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated: no footer
    dataset = DetectionDataset(copy, "train2017", train=False)
    assert dataset[0][1]["image_id"] == 1  # shard 0 is fine
    with pytest.raises(DatasetError, match=rf"{shard}: cannot read shard"):
        dataset[10]


def test_a_shard_without_a_column_or_of_another_size_is_named(copy: Path) -> None:
    shard = copy / "train2017" / "shard-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["labels"]), shard)
    with pytest.raises(DatasetError, match=rf"{shard}: missing column\(s\) \['labels'\]"):
        DetectionDataset(copy, "train2017", train=False)[0]
    index = copy / "train2017" / "index.parquet"
    table = pq.read_table(index)
    pq.write_table(table.set_column(1, "width", pa.array([100] * len(table), pa.int32())), index)
    with pytest.raises(
        DatasetError, match=r"shard-00001\.parquet row 0: image is 320x256, index says 100x256"
    ):
        DetectionDataset(copy, "train2017", train=False)[10]


def test_to_model_input_is_float_on_the_device() -> None:
    image = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8).expand(3, 2, 2)
    out = to_model_input(image, torch.device("cpu"))
    assert out.dtype == torch.float32 and torch.allclose(out[0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    already = torch.rand(3, 2, 2)
    assert torch.equal(to_model_input(already, torch.device("cpu")), already)
