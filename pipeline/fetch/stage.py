"""Stage fetch's machinery: one COCO-layout folder, whatever ``data.source`` is.

=============  ==============================================================
data.source    what fills the folder
=============  ==============================================================
synthetic      `pipeline.fetch.synthetic` (the embedded default; no network)
coco           `pipeline.fetch.coco_source` (cocodataset.org or a mirror; data.base_url)
local          `pipeline.fetch.local_source` (a folder named by ``--local-dir``)
=============  ==============================================================

The folder is built in a temporary sibling and renamed onto the target when complete
(`pipeline.io`), so a failed fetch leaves either the previous output or nothing.
Downloads live in a separate folder that outlives a failed run so that the next one resumes:
by default ``<out>.downloads``, deleted when a fetch succeeds; a folder given as
``downloads`` is kept (a cache of the archives for later runs).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.coco_format import annotation_path, missing_images, read_coco
from pipeline.config import ConfigError, DataConfig
from pipeline.fetch.coco_source import fetch_coco
from pipeline.fetch.local_source import copy_local
from pipeline.fetch.synthetic import generate_synthetic
from pipeline.io import atomic_directory


@dataclass(frozen=True)
class SplitSummary:
    """What one split of the fetched folder holds."""

    split: str
    images: int
    annotations: int
    categories: int
    missing_files: tuple[str, ...]  # file_names listed in the annotations but absent on disk


def fetch_dataset(
    cfg: DataConfig,
    out: str | Path,
    *,
    local_dir: str | Path | None = None,
    downloads: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    splits: tuple[str, ...] | None = None,
) -> list[SplitSummary]:
    """Fill ``out`` with ``annotations/instances_<split>.json`` and ``<split>/`` for both splits.

    ``local_dir`` is required for, and only allowed with, ``data.source: local``; so is ``splits``,
    which fetches only those of the two splits (e.g. the validation split alone, for
    benchmarks/coco_fidelity.py: no need to copy COCO's 118k training images to evaluate). An existing
    ``out`` is replaced only if fetch wrote it (or ``force``; `pipeline.io.check_output_folder`). Raises
    `ConfigError` for a source/argument mismatch, and the source's own error (`FetchError`,
    `DownloadError`, `ArchiveError`, `CocoFormatError`) naming the URL or file otherwise.
    """
    out = Path(out)
    if cfg.source == "local" and local_dir is None:
        raise ConfigError("data.source is 'local': name the COCO-layout folder with --local-dir DIR")
    if cfg.source != "local" and local_dir is not None:
        raise ConfigError(f"--local-dir is given but data.source is {cfg.source!r}: set data.source: local")
    both = (cfg.train_split, cfg.val_split)
    if splits is not None and (cfg.source != "local" or not splits or not set(splits) <= set(both)):
        raise ConfigError(
            f"splits {list(splits)}: a subset of {list(both)} can be fetched only with data.source: local"
        )
    own_downloads = downloads is None
    downloads = out.with_name(out.name + ".downloads") if downloads is None else Path(downloads)
    inputs = [local_dir] if local_dir is not None else []
    with atomic_directory(out, stage="fetch", force=force, inputs=inputs) as tmp:
        if cfg.source == "synthetic":
            generate_synthetic(cfg, tmp, progress=progress)
        elif cfg.source == "coco":
            fetch_coco(cfg, tmp, downloads, progress=progress)
        else:
            copy_local(cfg, Path(local_dir), tmp, splits=splits or both, progress=progress)  # type: ignore[arg-type]
        summaries = [_summarise(tmp, split) for split in splits or both]
    if own_downloads:  # a folder the user named (--downloads) is theirs: kept, e.g. as a cache of the zips
        shutil.rmtree(downloads, ignore_errors=True)
    return summaries


def _summarise(root: Path, split: str) -> SplitSummary:
    coco = read_coco(annotation_path(root, split))
    return SplitSummary(
        split=split,
        images=len(coco["images"]),
        annotations=len(coco["annotations"]),
        categories=len(coco["categories"]),
        missing_files=tuple(missing_images(root, split, coco)),
    )
