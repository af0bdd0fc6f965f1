"""The preprocessed data as torch sees it: a Dataset, its collate, an aspect-ratio grouped sampler.

Reads what stage preprocess wrote (`pipeline.preprocess.stage`): ``<root>/<split>/index.json``,
``<root>/<split>/images/<image_id>.jpg``, ``categories.json`` and ``manifest.json``. Images are
already at the model's scale, so loading is decode + convert (+ flip in training).

An item is ``(image, target)``:

* ``image``: ``Tensor[3, H, W]`` float32 in 0..1, RGB;
* ``target``: ``{"boxes": float32[N, 4]`` xyxy in the image's pixels, ``"labels": int64[N]``
  in 1..K, ``"image_id": int}`` (the COCO image id). N may be 0. Crowd regions are not in
  ``boxes`` (they are ignored in training; evaluation reads them from the COCO file).

`GroupedBatchSampler` puts landscape (w >= h) and portrait images in different batches, so
a batch pads little (the FPN paper's input sizes are up to 1333 x 800), shards batches over
DDP ranks, and reshuffles deterministically from ``seed + epoch`` (call ``set_epoch``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file


class DatasetError(ValueError):
    """Preprocessed data that is missing or inconsistent; the message names the file."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run stage preprocess first)") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


# What every reader of an index needs of each image record (training reads boxes and labels too).
INDEX_IMAGE_KEYS = ("image_id", "file", "scale_x", "scale_y")


def read_index(root: str | Path, split: str) -> dict[str, Any]:
    """``<root>/<split>/index.json``: ``{"split", "annotation_file", "images": [record, ...]}``."""
    path = Path(root) / split / "index.json"
    index = _read_json(path)
    if not isinstance(index, dict) or not isinstance(index.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list")
    if "annotation_file" not in index:
        raise DatasetError(f"{path}: missing key 'annotation_file'")
    for i, entry in enumerate(index["images"]):
        for key in INDEX_IMAGE_KEYS:
            if key not in entry:
                raise DatasetError(f"{path}: images[{i}] lacks {key!r}")
    return index


def read_categories(root: str | Path) -> list[dict[str, Any]]:
    """``categories.json``: ``[{"label": 1..K, "id": <COCO category id>, "name": str}, ...]`` by label."""
    path = Path(root) / "categories.json"
    categories = _read_json(path)
    if not isinstance(categories, list) or [c.get("label") for c in categories] != list(
        range(1, len(categories) + 1)
    ):
        raise DatasetError(f"{path}: expected a list of categories with labels 1..K in order")
    return categories


def read_data_hash(root: str | Path) -> str:
    """``manifest.json``'s ``data_hash``: sha256 of the index files and categories."""
    path = Path(root) / "manifest.json"
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("data_hash"), str):
        raise DatasetError(f"{path}: no 'data_hash'")
    return manifest["data_hash"]


class DetectionDataset(Dataset):
    """One split of the preprocessed data (see the module docstring for the items).

    With ``train=True`` each item is flipped horizontally with probability ``flip_prob``. The
    draw is a function of ``(seed, epoch, index)`` alone (`flips`; call `set_epoch` before each
    epoch), not of any process's random stream: the same with or without DataLoader workers,
    the same after a resume mid-epoch, and independent between images, so DDP ranks (which
    see different images) flip independently.
    """

    def __init__(
        self, root: str | Path, split: str, *, train: bool, flip_prob: float = 0.5, seed: int = 0
    ) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.root = Path(root)
        self.split = split
        self.train = train
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0
        index = read_index(root, split)
        self.annotation_file: str = index.get("annotation_file", "")
        self.records: list[dict[str, Any]] = index["images"]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose flips `__getitem__` draws (DataLoader workers copy it at iterator creation)."""
        self.epoch = epoch

    def flips(self, i: int) -> bool:
        """Whether item ``i`` is flipped this epoch: a uniform draw seeded by ``(seed, epoch, i)``."""
        return bool(np.random.default_rng((self.seed, self.epoch, i)).random() < self.flip_prob)

    @property
    def aspect_ratios(self) -> list[float]:
        """width / height of every image, in index order."""
        return [record["aspect_ratio"] for record in self.records]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[i]
        path = self.root / self.split / record["file"]
        try:
            data = read_file(str(path))
        except RuntimeError as err:
            raise DatasetError(f"{path}: cannot read ({err})") from None
        image = decode_jpeg(data, mode=ImageReadMode.RGB)  # (3, H, W) uint8
        if image.shape[1:] != (record["height"], record["width"]):
            raise DatasetError(
                f"{path}: is {image.shape[2]}x{image.shape[1]}, index says {record['width']}x{record['height']}"
            )
        image = image.float().div_(255.0)
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)  # (N, 4) xyxy
        labels = torch.tensor(record["labels"], dtype=torch.int64)
        if self.train and self.flip_prob > 0 and self.flips(i):
            image, boxes = hflip(image, boxes)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(record["image_id"])}


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror ``image`` (..., H, W) left-right and its ``boxes`` (N, 4) xyxy: x -> W - x."""
    width = image.shape[-1]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), flipped


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A batch as the detector takes it: a list of images (sizes may differ) and a list of targets."""
    return [image for image, _ in batch], [target for _, target in batch]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose images share an orientation, sharded over DDP ranks.

    Per epoch: a permutation of all indices (``torch.randperm`` seeded by ``seed + epoch``,
    or index order without ``shuffle``) is walked once; each index joins its group's open
    batch (group 0: width >= height, group 1: portrait), and a batch is emitted when full.
    The groups' partial last batches follow. Every rank computes the same list, pads it by
    repeating from its start to a multiple of ``world_size`` (so every rank runs the same
    number of steps: DDP's collectives would hang otherwise), and takes every
    ``world_size``-th batch from ``rank``.
    """

    def __init__(
        self,
        dataset: DetectionDataset | Sequence[float],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        ratios = dataset.aspect_ratios if isinstance(dataset, DetectionDataset) else list(dataset)
        self.groups = [0 if ratio >= 1.0 else 1 for ratio in ratios]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` on the next iteration (same on every rank)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.groups), generator=generator).tolist()
        else:
            order = list(range(len(self.groups)))
        open_batches: dict[int, list[int]] = {0: [], 1: []}
        batches: list[list[int]] = []
        for i in order:
            batch = open_batches[self.groups[i]]
            batch.append(i)
            if len(batch) == self.batch_size:
                batches.append(batch)
                open_batches[self.groups[i]] = []
        batches.extend(batch for batch in open_batches.values() if batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        if not batches:
            return iter([])
        total = len(self) * self.world_size
        padded = [batches[i % len(batches)] for i in range(total)]
        return iter(padded[self.rank :: self.world_size])

    def __len__(self) -> int:
        per_group = (self.groups.count(g) for g in (0, 1))
        batches = sum(math.ceil(n / self.batch_size) for n in per_group)
        return math.ceil(batches / self.world_size)
