"""The Ray Data feed's plan, read and decode steps (`pipeline.train.streaming`), without Ray.

The Ray Train runs through Ray Data are in `tests.pipeline.train.test_ray_train`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.config import params_from_dict
from pipeline.dataset import DetectionDataset
from pipeline.train.loop import TrainJob, epoch_batches
from pipeline.train.sessions import LocalSession
from pipeline.train.streaming import ReadRows, epoch_plan, epochs_needed, stream_batches
from tests.train_samples import tiny_data, tiny_params


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("streaming-data"), train_images=11)


class Rank(LocalSession):
    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__("unused")
        self.rank, self.world_size = rank, world_size


def planned_rows(data: Path, epoch: int, rank: int, world_size: int) -> list[dict]:
    dataset = DetectionDataset(data, "train2017", train=True, flip_prob=0.5, seed=3)
    rows = epoch_plan(dataset, batch_size=2, seed=3, epoch=epoch, rank=rank, world_size=world_size)
    return ReadRows(str(data), "train2017")(pa.Table.from_pylist(rows)).to_pylist()


@pytest.mark.parametrize(("epoch", "rank"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_stream_gives_the_dataloader_batches_of_each_rank_and_epoch(
    data: Path, epoch: int, rank: int
) -> None:
    params = params_from_dict(tiny_params(batch_size=2, seed=3, flip_prob=0.5))
    job = TrainJob(
        params=params, data_root=str(data), run_name="t", data_hash="h", git_commit="c",
        tracking_uri=None, init_weights_file=None,
    )  # fmt: skip
    dataset = DetectionDataset(data, "train2017", train=True, flip_prob=0.5, seed=3)
    expected = epoch_batches(dataset, job, Rank(rank, 2), epoch)
    dataset.set_epoch(epoch)
    streamed = list(stream_batches(iter(planned_rows(data, epoch, rank, 2)), 0))
    assert len(streamed) == len(expected) == 3  # 11 images in 2 aspect groups, batch 2, padded to 2 ranks
    assert any(row["flip"] for e in (0, 1) for row in planned_rows(data, e, rank, 2)), "some images flip"
    for (images, targets), indices in zip(streamed, expected, strict=True):
        assert [t["image_id"] for t in targets] == [int(dataset.index.image_ids[i]) for i in indices]
        for image, target, i in zip(images, targets, indices, strict=True):
            want_image, want_target = dataset[i]  # flipped by the same (seed, epoch, index) draw
            assert image.dtype == torch.uint8 and torch.equal(image, want_image)
            assert torch.equal(target["boxes"], want_target["boxes"])
            assert torch.equal(target["labels"], want_target["labels"])


def test_a_resumed_epoch_starts_at_its_batch(data: Path) -> None:
    rows = planned_rows(data, 1, 0, 1)
    whole = list(stream_batches(iter(rows), 0))
    resumed = list(stream_batches(iter(rows), 2))
    assert len(whole) == 6 and len(resumed) == 4
    for (a_images, a_targets), (b_images, b_targets) in zip(whole[2:], resumed, strict=True):
        assert [t["image_id"] for t in a_targets] == [t["image_id"] for t in b_targets]
        assert all(torch.equal(x, y) for x, y in zip(a_images, b_images, strict=True))


def test_epochs_cover_the_iterations() -> None:
    assert [epochs_needed(3, n) for n in (1, 3, 4, 7)] == [1, 1, 2, 3]


def test_an_unknown_loader_is_refused() -> None:
    with pytest.raises(ValueError, match=r"loader: must be one of torch, ray_data, got 'dali'"):
        params_from_dict(tiny_params(loader="dali"))
