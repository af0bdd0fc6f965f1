"""The preprocessed data as torch sees it: the shard format, its index, a Dataset, its collate, a sampler.

Reads what stage preprocess wrote (`pipeline.preprocess.stage`)::

    <root>/<split>/shard-00000.parquet, ...  one row per image (`SHARD_SCHEMA`), row groups of
                                             `ROW_GROUP_ROWS` images
    <root>/<split>/index.parquet             one small row per image (`INDEX_SCHEMA`): where it is
    <root>/<split>/split.json                {"split", "annotation_file", "shards": [names], "images": N}
    <root>/categories.json, manifest.json

``<root>`` is a folder or an object-store URI (``s3://bucket/prefix``: every reader here goes
through `pipeline.storage`, i.e. pyarrow's filesystems, with the AWS variables of the
environment); stage preprocess writes a folder, which ``aws s3 sync`` or ``dvc push`` copies up.

A shard row is ``image_id`` (COCO's), ``file`` (its name in the COCO folder), ``image`` (the
ORIGINAL encoded JPEG bytes; an image that was not an RGB JPEG is stored converted to one),
``width``/``height`` of that image, ``boxes`` (flat xyxy, N*4, original pixels), ``labels``
(N, 1..K) and ``crowd_boxes`` (flat xyxy). Images are not resized: the detector's own transform
resizes them, and its detections come back in these (original) pixels, COCO's frame.

Why Parquet: pyarrow is already installed with Ray Data, whose ``ray.data.read_parquet`` reads
it natively (column projection, any pyarrow filesystem, s3:// included); the index's columns
load as numpy arrays (28 bytes per image: about 3.3 MB for COCO's 118k training images, in every
process); and row groups give the torch Dataset random access to one image without reading its
whole shard (a read costs one row group: at most `ROW_GROUP_ROWS` images). WebDataset tars would
add a library and read only sequentially.

An item is ``(image, target)``:

* ``image``: ``Tensor[3, H, W]`` uint8, RGB (`to_model_input` makes it float 0..1 on the device);
* ``target``: ``{"boxes": float32[N, 4]`` xyxy in the image's pixels, ``"labels": int64[N]``
  in 1..K, ``"image_id": int}`` (the COCO image id). N may be 0. Crowd regions are not in
  ``boxes`` (they are ignored in training; evaluation reads them from the COCO file).

`GroupedBatchSampler` puts landscape (w >= h) and portrait images in different batches, so
a batch pads little (the FPN paper's input sizes are up to 1333 x 800), shards batches over
DDP ranks, and reshuffles deterministically from ``seed + epoch`` (call ``set_epoch``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.storage import is_uri, join_location, location_exists, open_location, read_location

SPLIT_FILE = "split.json"
INDEX_FILE = "index.parquet"
HASH_BLOCK = 1 << 20
ROW_GROUP_ROWS = 16  # images per row group: the unit a random read decodes from disk
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.int64())),
        ("crowd_boxes", pa.list_(pa.float32())),
    ]
)
INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("num_boxes", pa.int32()),
    ]
)
ITEM_COLUMNS = ["image_id", "image", "width", "height", "boxes", "labels"]  # what an item reads


class DatasetError(ValueError):
    """Preprocessed data that is missing or inconsistent; the message names the file."""


def shard_name(number: int) -> str:
    """The file name of shard ``number`` of a split: ``shard-00000.parquet``."""
    return f"shard-{number:05d}.parquet"


def data_location(root: str | Path) -> str:
    """The preprocessed data's location as every reader takes it: an absolute path, or a URI unchanged."""
    return str(root) if is_uri(str(root)) else str(Path(root).absolute())


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(read_location(str(path)))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run stage preprocess first)") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """A split's compact index: one entry per image in the arrays (index order), and its files.

    ``shards[i]``/``rows[i]`` locate image ``i`` in ``shard_files[shards[i]]``; ``widths``/``heights``
    are its pixels. Plain numpy arrays: about 28 bytes per image, cheap to pickle to workers.
    """

    folder: str  # <root>/<split>: an absolute path or an object-store URI (`data_location`)
    split: str
    annotation_file: str  # the original COCO file: the ground truth for evaluation
    shard_files: tuple[str, ...]  # names in ``folder``, in shard-number order
    image_ids: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int32
    heights: np.ndarray  # (N,) int32
    shards: np.ndarray  # (N,) int32
    rows: np.ndarray  # (N,) int32
    num_boxes: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def aspect_ratios(self) -> np.ndarray:
        """(N,) float64 width / height."""
        return self.widths / self.heights

    def shard_path(self, shard: int) -> str:
        return join_location(self.folder, self.shard_files[shard])

    def files(self) -> list[Path]:
        """Every file of the split, in data-hash order: the shards, the index, split.json (local data only)."""
        if is_uri(self.folder):
            raise DatasetError(f"{self.folder}: hashing needs the data on a local path")
        folder = Path(self.folder)
        return [*(folder / name for name in self.shard_files), folder / INDEX_FILE, folder / SPLIT_FILE]


def read_index(root: str | Path, split: str) -> SplitIndex:
    """``<root>/<split>``'s split.json and index.parquet as a `SplitIndex`; `DatasetError` naming the file."""
    # Absolute: a Ray task runs in the shipped copy of the code. Or a URI (s3://...).
    folder = join_location(data_location(root), split)
    meta = _read_json(join_location(folder, SPLIT_FILE))
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("annotation_file"), str)
        and isinstance(meta.get("shards"), list)
    ):
        raise DatasetError(
            f"{join_location(folder, SPLIT_FILE)}: expected an object with 'annotation_file' and 'shards'"
        )
    path = join_location(folder, INDEX_FILE)
    try:
        table = pq.read_table(open_location(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (run stage preprocess first)") from None
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [name for name in INDEX_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}")
    try:
        table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    except pa.ArrowException as err:
        raise DatasetError(f"{path}: a column of the wrong type ({err})") from None
    columns = {name: table.column(name).to_numpy() for name in INDEX_SCHEMA.names}
    shard_files = tuple(str(name) for name in meta["shards"])
    if len(table) and (columns["shard"].min() < 0 or columns["shard"].max() >= len(shard_files)):
        raise DatasetError(f"{path}: a shard number is outside the {len(shard_files)} shards of {SPLIT_FILE}")
    for name in shard_files:
        if not location_exists(join_location(folder, name)):
            raise DatasetError(
                f"{join_location(folder, name)}: shard not found (listed in {join_location(folder, SPLIT_FILE)})"
            )
    return SplitIndex(
        folder=folder,
        split=split,
        annotation_file=meta["annotation_file"],
        shard_files=shard_files,
        image_ids=columns["image_id"],
        widths=columns["width"],
        heights=columns["height"],
        shards=columns["shard"],
        rows=columns["row"],
        num_boxes=columns["num_boxes"],
    )


class ShardReader:
    """Reads image rows of a split's shards by ``(shard, row)``, one row group at a time.

    Each shard's `pq.ParquetFile` is opened lazily and kept; the last ``cache_groups`` row groups
    read are kept too (sequential reading decodes each group once). Pickles without them, so a
    DataLoader or Ray worker opens its own.
    """

    def __init__(self, index: SplitIndex, *, cache_groups: int = 4) -> None:
        self.index = index
        self.cache_groups = cache_groups
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index, "cache_groups": self.cache_groups}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _files={}, _groups=OrderedDict())

    def _open(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard not in self._files:
            path = self.index.shard_path(shard)
            try:
                file = pq.ParquetFile(open_location(path))
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(f"{path}: cannot read shard ({err})") from None
            missing = [name for name in ITEM_COLUMNS if name not in file.schema_arrow.names]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}")
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
            self._files[shard] = (file, np.cumsum([0, *sizes]))
        return self._files[shard]

    def row(self, shard: int, row: int) -> dict[str, Any]:
        """Row ``row`` of shard ``shard`` as Python values (``image`` as bytes)."""
        file, starts = self._open(shard)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        if not 0 <= group < file.num_row_groups:
            raise DatasetError(f"{self.index.shard_path(shard)}: has no row {row}")
        key = (shard, group)
        table = self._groups.get(key)
        if table is None:
            try:
                table = file.read_row_group(group, columns=ITEM_COLUMNS)
            except (OSError, pa.ArrowException) as err:
                raise DatasetError(
                    f"{self.index.shard_path(shard)}: cannot read row group {group} ({err})"
                ) from None
            self._groups[key] = table
            if len(self._groups) > self.cache_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        offset = row - int(starts[group])
        return {name: table.column(name)[offset].as_py() for name in ITEM_COLUMNS}

    def image(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Image ``i`` of the index decoded (``(3, H, W)`` uint8) and its shard row."""
        index = self.index
        shard, row = int(index.shards[i]), int(index.rows[i])
        values = self.row(shard, row)
        where = f"{index.shard_path(shard)} row {row}"
        if values["image_id"] != int(index.image_ids[i]):
            raise DatasetError(
                f"{where}: image id {values['image_id']}, index says {int(index.image_ids[i])}"
            )
        image = decode_rgb(values["image"], where)
        expected = (int(index.heights[i]), int(index.widths[i]))
        if tuple(image.shape[1:]) != expected or (values["height"], values["width"]) != expected:
            raise DatasetError(
                f"{where}: image is {image.shape[2]}x{image.shape[1]}, index says {expected[1]}x{expected[0]}"
            )
        return image, values


def decode_rgb(data: bytes, where: str) -> torch.Tensor:
    """JPEG bytes -> ``(3, H, W)`` uint8 RGB; `DatasetError` naming ``where`` if they do not decode."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DatasetError(f"{where}: cannot decode the image ({err})") from None


def to_model_input(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image as the detector takes it: moved to ``device``, then float 0..1 there.

    uint8 (as the dataset gives it) is divided by 255 after the copy, so a quarter of the bytes
    cross to the GPU; a floating image is taken as already 0..1.
    """
    image = image.to(device, non_blocking=True)
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the bytes of ``paths``, in order, read a block at a time (shards are large).

    The data hash (manifest.json) is this over every split's `SplitIndex.files` and categories.json.
    """
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def read_categories(root: str | Path) -> list[dict[str, Any]]:
    """``categories.json``: ``[{"label": 1..K, "id": <COCO category id>, "name": str}, ...]`` by label."""
    path = join_location(data_location(root), "categories.json")
    categories = _read_json(path)
    if not isinstance(categories, list) or [c.get("label") for c in categories] != list(
        range(1, len(categories) + 1)
    ):
        raise DatasetError(f"{path}: expected a list of categories with labels 1..K in order")
    return categories


def completion_files(splits: Sequence[str]) -> list[str]:
    """The files that mark a preprocessed folder complete, in the order a copy writes them last:
    each split's ``split.json``, ``categories.json``, ``manifest.json`` (readers open these first,
    so a copy that stops half-way reads as absent)."""
    return [*(f"{split}/{SPLIT_FILE}" for split in splits), "categories.json", "manifest.json"]


def read_data_hash(root: str | Path) -> str:
    """``manifest.json``'s ``data_hash``: sha256 of every split's files and categories."""
    path = join_location(data_location(root), "manifest.json")
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
        self.root = data_location(root)  # a path or a URI
        self.split = split
        self.train = train
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0
        self.index = read_index(root, split)
        self.annotation_file = self.index.annotation_file
        self.reader = ShardReader(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose flips `__getitem__` draws (DataLoader workers copy it at iterator creation)."""
        self.epoch = epoch

    def flips(self, i: int) -> bool:
        """Whether item ``i`` is flipped this epoch: a uniform draw seeded by ``(seed, epoch, i)``."""
        return bool(np.random.default_rng((self.seed, self.epoch, i)).random() < self.flip_prob)

    @property
    def aspect_ratios(self) -> np.ndarray:
        """(N,) width / height of every image, in index order."""
        return self.index.aspect_ratios

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, values = self.reader.image(i)
        boxes = torch.tensor(values["boxes"], dtype=torch.float32).reshape(-1, 4)  # (N, 4) xyxy
        labels = torch.tensor(values["labels"], dtype=torch.int64)
        if self.train and self.flip_prob > 0 and self.flips(i):
            image, boxes = hflip(image, boxes)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(values["image_id"])}


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

    def batches_of(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (`set_epoch`, then the list): what a DataLoader over the
        sampler gives and what `pipeline.train.streaming` plans for Ray Data."""
        self.set_epoch(epoch)
        return [list(batch) for batch in self]
