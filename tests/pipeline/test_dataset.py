"""pipeline.dataset over a real preprocessed output: items, flip, collate, grouped DDP sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
)
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.preprocess.stage import preprocess_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dataset")
    cfg = DataConfig(synthetic_train_images=24, synthetic_val_images=4, seed=1)
    generate_synthetic(cfg, base / "coco", progress=False)
    preprocess_dataset(
        base / "coco", base / "pre", splits=("train2017", "val2017"), min_size=128, max_size=160,
        cfg=PreprocessConfig(workers=1), progress=False,
    )  # fmt: skip
    return base / "pre"


def test_items_follow_the_index(root: Path) -> None:
    dataset = DetectionDataset(root, "train2017", train=False)
    records = json.loads((root / "train2017" / "index.json").read_text())["images"]
    assert len(dataset) == 24
    for i in (0, 5):
        image, target = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 160)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert target["image_id"] == records[i]["image_id"]
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert torch.allclose(target["boxes"], torch.tensor(records[i]["boxes"]).reshape(-1, 4))
        assert set(target["labels"].tolist()) <= {1, 2, 3}


def test_empty_image_gives_empty_target(root: Path) -> None:
    dataset = DetectionDataset(root, "train2017", train=True)
    empty = [i for i, r in enumerate(dataset.records) if not r["boxes"]]
    assert empty, "the synthetic set should contain an image without objects at this seed"
    _, target = dataset[empty[0]]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_flip_mirrors_image_and_boxes(root: Path) -> None:
    plain, plain_target = DetectionDataset(root, "train2017", train=False)[1]
    flipped, flipped_target = DetectionDataset(root, "train2017", train=True, flip_prob=1.0)[1]
    assert torch.equal(flipped, plain.flip(-1))
    x1, y1, x2, y2 = plain_target["boxes"].unbind(1)
    expected = torch.stack([160 - x2, y1, 160 - x1, y2], 1)
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
    with pytest.raises(DatasetError, match=rf"{tmp_path}/val2017/index\.json: not found"):
        DetectionDataset(tmp_path, "val2017", train=False)
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        read_data_hash(tmp_path)
