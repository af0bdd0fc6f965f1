"""Training data through Ray Data (``train.loader: ray_data``): shards streamed to each Ray Train worker.

The order of the data is planned on the driver, the bytes are read by Ray Data, and each worker
decodes what it trains on:

* `epoch_plan` -- one rank's batches of one epoch: the same `GroupedBatchSampler` lists (aspect
  ratios grouped, shuffled by ``train.seed`` + epoch, sharded by rank, padded so every rank has
  as many) and the same flips (`DetectionDataset.flips`) as the torch DataLoader path, as rows
  ``{"batch", "index", "flip"}`` (one per image, in order).
* `plan_datasets` -- one Ray Dataset per (rank, epoch), named `dataset_name`: the plan's rows,
  then `ReadRows` (``map_batches``) attaching each image's encoded bytes, boxes, labels and id
  from the Parquet shards. Handed to ``TorchTrainer(datasets=..., dataset_config=
  DataConfig(datasets_to_split=[]))`` so that each worker gets its own rank's datasets whole
  (``ray.train.get_dataset_shard(dataset_name(rank, epoch))``), in order
  (``preserve_order``): the epoch order is the seed's, not the order tasks finish in.
* `stream_batches` -- on the worker: the rows of one epoch from batch ``start`` on, decoded
  (``(3, H, W)`` uint8, flipped as planned) into the loop's ``(images, targets)`` batches.

Resume: exact. A worker restarted from a checkpoint at ``(epoch, batch_in_epoch)`` opens that
epoch's dataset and skips the rows of the batches already trained on (their bytes are read,
not decoded; earlier epochs' datasets are never executed), so a resumed run trains on the very
batches the uninterrupted one would, as with the DataLoader path.

Images stay uint8 until the device (`pipeline.dataset.to_model_input`). Ray Data needs CPUs
beyond the training workers' for its read tasks (each node: more than ``cpus_per_worker`` x
workers there). Without Ray (``--no-ray``) the loop reads the same shards through a torch
Dataset instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.dataset import DetectionDataset, GroupedBatchSampler, decode_rgb, hflip, read_index

READ_COLUMNS = ("image", "boxes", "labels", "image_id")
READ_CPUS = 0.25  # per reading actor: it waits on storage more than it computes


def dataset_name(rank: int, epoch: int) -> str:
    return f"train_r{rank}_e{epoch}"


def epoch_plan(
    dataset: DetectionDataset, *, batch_size: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[dict[str, Any]]:
    """Rank ``rank``'s batches of ``epoch`` as rows ``{"batch", "index", "flip"}``, one per image, in order."""
    sampler = GroupedBatchSampler(
        dataset, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
    )
    dataset.set_epoch(epoch)
    flips = dataset.train and dataset.flip_prob > 0
    return [
        {"batch": b, "index": int(i), "flip": bool(flips and dataset.flips(int(i)))}
        for b, batch in enumerate(sampler.batches_of(epoch))
        for i in batch
    ]


def epochs_needed(batches_per_epoch: int, iterations: int) -> int:
    """Epochs a rank runs to reach ``iterations`` steps at ``batches_per_epoch`` steps an epoch."""
    return math.ceil(iterations / batches_per_epoch)


class ReadRows:
    """``map_batches`` callable: a pyarrow batch of plan rows -> the same rows with `READ_COLUMNS`.

    ``image`` is the encoded bytes as stored, ``boxes`` the (N*4,) xyxy floats in original
    pixels, ``labels`` (N,) ints. The shard reader keeps its row-group cache across batches.
    """

    def __init__(self, root: str, split: str) -> None:
        from pipeline.dataset import ShardReader

        self.index = read_index(root, split)
        self.reader = ShardReader(self.index)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        images, boxes, labels, ids = [], [], [], []
        for i in batch.column("index").to_pylist():
            values = self.reader.row(int(self.index.shards[i]), int(self.index.rows[i]))
            images.append(values["image"])
            boxes.append([float(v) for v in values["boxes"]])  # stored flat: (N*4,)
            labels.append([int(v) for v in values["labels"]])
            ids.append(int(values["image_id"]))
        columns = {
            "image": pa.array(images, pa.binary()),
            "boxes": pa.array(boxes, pa.list_(pa.float32())),
            "labels": pa.array(labels, pa.list_(pa.int64())),
            "image_id": pa.array(ids, pa.int64()),
        }
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch


def plan_datasets(
    root: str, split: str, *, batch_size: int, seed: int, flip_prob: float, world_size: int, iterations: int
) -> dict[str, Any]:
    """Every (rank, epoch)'s Ray Dataset up to ``iterations`` steps, by `dataset_name` (lazy: nothing runs yet)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = DetectionDataset(root, split, train=True, flip_prob=flip_prob, seed=seed)
    per_epoch = len(GroupedBatchSampler(dataset, batch_size, shuffle=True, seed=seed, world_size=world_size))
    if per_epoch == 0:
        raise ValueError(f"{root}: the split {split} has no training image")
    datasets = {}
    for epoch in range(epochs_needed(per_epoch, iterations)):
        for rank in range(world_size):
            rows = epoch_plan(
                dataset, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size
            )
            datasets[dataset_name(rank, epoch)] = ray.data.from_items(rows).map_batches(
                ReadRows, fn_constructor_kwargs={"root": root, "split": split}, batch_format="pyarrow",
                batch_size=batch_size * 4, concurrency=1, num_cpus=READ_CPUS,
            )  # fmt: skip
    return datasets


def stream_batches(
    rows: Iterator[dict[str, Any]], start: int
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
    """One epoch's rows (in plan order) -> ``(images, targets)`` batches from batch ``start`` on.

    Images ``(3, H, W)`` uint8, flipped where planned; targets ``{"boxes": (N, 4) float32 xyxy,
    "labels": (N,) int64, "image_id": int}``, as `pipeline.dataset.collate` gives them.
    """
    images: list[torch.Tensor] = []
    targets: list[dict[str, Any]] = []
    current = None
    for row in rows:
        if row["batch"] < start:
            continue  # trained on before the resume: read, not decoded
        if current is not None and row["batch"] != current:
            yield images, targets
            images, targets = [], []
        current = row["batch"]
        where = f"image id {row['image_id']} (index {row['index']})"
        image = decode_rgb(bytes(row["image"]), where)
        boxes = torch.as_tensor(np.asarray(row["boxes"], dtype=np.float32)).reshape(-1, 4)
        if row["flip"]:
            image, boxes = hflip(image, boxes)
        images.append(image)
        labels = torch.as_tensor(np.asarray(row["labels"], dtype=np.int64))
        targets.append({"boxes": boxes, "labels": labels, "image_id": int(row["image_id"])})
    if images:
        yield images, targets
