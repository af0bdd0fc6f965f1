"""One split of a COCO-layout folder through the pipeline's own stages: fetch (local source), then preprocess.

benchmarks/coco_fidelity.py evaluates on what this writes and benchmarks/bench_loader.py times the
training loader on it, so both measure the Parquet shards stage preprocess makes of real COCO files,
not a copy of that code. It imports neither fpn nor pycocotools.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.fetch.stage import fetch_dataset
from pipeline.preprocess.stage import preprocess_dataset


def fetch_and_preprocess(
    coco_dir: Path, work: Path, split: str, *, limit: int | None = None, progress: bool = True
) -> Path:
    """Fetch ``split`` of ``coco_dir`` into ``work/coco`` and preprocess it into ``work/preprocessed``.

    Stage fetch's local source (``--local-dir``; hard links where the file system allows, else
    copies) takes only ``split``, cut to the first ``limit`` images of its annotation file when
    given (``data.max_images``); stage preprocess runs with the default `PreprocessConfig`.
    Returns the preprocessed folder. Bad input raises the stages' own errors (`CocoFormatError`,
    `PreprocessError`), naming the file.
    """
    other = "train2017" if split != "train2017" else "val2017"  # DataConfig wants two distinct splits
    data = DataConfig(source="local", max_images=limit, val_split=split, train_split=other, local_link=True)
    fetched, preprocessed = work / "coco", work / "preprocessed"
    fetch_dataset(data, fetched, local_dir=coco_dir, splits=(split,), progress=progress)
    preprocess_dataset(fetched, preprocessed, splits=(split,), cfg=PreprocessConfig(), progress=progress)
    return preprocessed
