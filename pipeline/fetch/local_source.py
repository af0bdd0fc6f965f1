"""A COCO-layout folder already on disk (``data.source: local``) into the fetch output.

The folder is named on the command line (``--local-dir``), not in params.yaml: it is a
path, and dvc.yaml is the one place that names paths (there it can also be a ``deps:``
entry, so DVC re-runs fetch when the folder changes). Its annotation files are checked with
`pipeline.coco_format.read_coco` and, like the other sources, cut to the first
``data.max_images`` images when that is set.

Images are copied, or hard-linked with ``data.local_link: true`` (same filesystem only;
falls back to a copy). Hard links cost no space, but the output then shares inodes with the
source folder: DVC's cache makes cached files read-only, and with links that also applies
to the originals. Missing images are not fatal here: they are listed, and stage preprocess
reports and skips them per file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipeline.coco_format import (
    CocoFormatError,
    annotation_path,
    first_images,
    image_dir,
    read_coco,
    write_json,
)
from pipeline.config import DataConfig


def copy_local(
    cfg: DataConfig,
    source: Path,
    out: Path,
    *,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> None:
    """Copy (or link) ``source``'s ``splits`` (default ``cfg.train_split`` and ``cfg.val_split``) into ``out``.

    Reads data.train_split / val_split, data.max_images, data.local_link and data.download_workers
    (as the number of copying threads). Raises `CocoFormatError` naming the file when
    ``source`` is not in COCO layout.
    """
    if not source.is_dir():
        raise CocoFormatError(f"{source}: --local-dir is not a directory")
    for split in splits or (cfg.train_split, cfg.val_split):
        coco = read_coco(annotation_path(source, split))
        if cfg.max_images is None:
            target = annotation_path(out, split)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(annotation_path(source, split), target)
        else:
            coco = first_images(coco, cfg.max_images)
            write_json(annotation_path(out, split), coco)
        if not image_dir(source, split).is_dir():
            raise CocoFormatError(f"{image_dir(source, split)}: image folder of split {split!r} not found")
        names = [image["file_name"] for image in coco["images"]]
        present = [name for name in names if (image_dir(source, split) / name).is_file()]
        with ThreadPoolExecutor(max(1, cfg.download_workers)) as pool:
            jobs = pool.map(
                lambda name, s=split: _place(
                    image_dir(source, s) / name, image_dir(out, s) / name, cfg.local_link
                ),
                present,
            )
            for _ in tqdm(jobs, total=len(present), desc=f"copy {split}", unit="file", disable=not progress):
                pass


def _place(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem, or links not allowed: copy instead
            pass
    shutil.copyfile(source, target)
