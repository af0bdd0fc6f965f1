"""Writing one split in the shard format of `pipeline.dataset` (its schemas, names and row groups).

`SplitWriter` takes prepared rows in order and streams them into ``shard-NNNNN.parquet`` files of
``images_per_shard`` rows, a row group of `pipeline.dataset.ROW_GROUP_ROWS` at a time (memory:
one row group), then writes ``index.parquet`` and ``split.json``. The caller gives it a folder
inside its `pipeline.io.atomic_directory`, so a crash leaves nothing behind.

Columns: ``image`` is stored uncompressed (JPEG bytes do not compress), the others zstd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.coco_format import write_json
from pipeline.dataset import INDEX_FILE, INDEX_SCHEMA, ROW_GROUP_ROWS, SHARD_SCHEMA, SPLIT_FILE, shard_name

# By Parquet column path: a list column's values are ``<name>.list.element``.
COMPRESSION = {
    name + (".list.element" if pa.types.is_list(SHARD_SCHEMA.field(name).type) else ""): "zstd"
    for name in SHARD_SCHEMA.names
} | {"image": "none"}
STATISTICS = ["image_id", "width", "height"]  # no min/max of the image bytes in the footer


class SplitWriter:
    """Rows (`pipeline.preprocess.prepare_image.ImageResult.row`) -> ``folder``'s shards, index and split.json."""

    def __init__(self, folder: Path, *, split: str, annotation_file: str, images_per_shard: int) -> None:
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard: must be >= 1, got {images_per_shard}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.split = split
        self.annotation_file = annotation_file
        self.images_per_shard = images_per_shard
        self.shards: list[str] = []
        self.index: dict[str, list[int]] = {name: [] for name in INDEX_SCHEMA.names}
        self._pending: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def __len__(self) -> int:
        return len(self.index["image_id"])

    def add(self, row: dict[str, Any]) -> None:
        """Append one image's row (the index entry follows from where it lands)."""
        if self._writer is None:
            self.shards.append(shard_name(len(self.shards)))
            self._writer = pq.ParquetWriter(
                self.folder / self.shards[-1], SHARD_SCHEMA, compression=COMPRESSION,
                use_dictionary=False, write_statistics=STATISTICS,
            )  # fmt: skip
        entry = {"shard": len(self.shards) - 1, "row": self._rows_in_shard, "num_boxes": len(row["labels"])}
        for name in INDEX_SCHEMA.names:
            self.index[name].append(entry[name] if name in entry else row[name])
        self._pending.append(row)
        self._rows_in_shard += 1
        if len(self._pending) == ROW_GROUP_ROWS:
            self._flush()
        if self._rows_in_shard == self.images_per_shard:
            self._close_shard()

    def close(self) -> list[Path]:
        """Finish the last shard, write ``index.parquet`` and ``split.json``; the split's files in hash order."""
        self._close_shard()
        pq.write_table(
            pa.table(self.index, schema=INDEX_SCHEMA), self.folder / INDEX_FILE, compression="zstd"
        )
        write_json(
            self.folder / SPLIT_FILE,
            {
                "split": self.split,
                "annotation_file": self.annotation_file,
                "shards": self.shards,
                "images": len(self),
            },
            indent=2,
        )
        return [
            *(self.folder / name for name in self.shards),
            self.folder / INDEX_FILE,
            self.folder / SPLIT_FILE,
        ]

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=SHARD_SCHEMA))
            self._pending = []

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        self._writer, self._rows_in_shard = None, 0
