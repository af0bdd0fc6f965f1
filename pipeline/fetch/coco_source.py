"""COCO from cocodataset.org (or a mirror laid out like it) into the COCO layout.

The host's layout (``data.base_url``, default http://images.cocodataset.org)::

    annotations/annotations_trainval<year>.zip   # holds annotations/instances_<split>.json
    zips/<split>.zip                             # holds <split>/<file_name>
    <split>/<file_name>                          # single images

With ``data.max_images`` unset, the split zips are downloaded and extracted whole. With it
set, only the first ``max_images`` images of each split's annotation file are downloaded,
one by one in parallel threads, and the annotation file is rewritten restricted to them:
500 real images cost megabytes, not the 19 GB of train2017.zip (the annotation zip, 241 MB,
is always needed).

Downloads go to a ``downloads`` folder that survives a failed or interrupted run, so the
next run resumes (see `pipeline.fetch.download`). Every download, cached or new, must be what
its name says (`pipeline.fetch.verify`: a structurally whole zip, a JPEG or PNG image) and as
long as the server announced; a bad copy, such as a mirror's HTML error page, is downloaded
again once, then reported with its path. Official archives are also checked against their
known sizes and MD5s when fetched from the official host; elsewhere (a mirror, a test server)
each member's CRC-32 at extraction is the last check. No checksum list is fetched from the
host: cocodataset.org publishes none beside its files, so there is no format to follow.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
from pathlib import Path

from pipeline.coco_format import annotation_path, first_images, image_dir, read_coco, write_json
from pipeline.config import DataConfig
from pipeline.fetch.archive import extract_zip
from pipeline.fetch.download import Expected, UnreachableError, download_file, download_many

OFFICIAL_BASE_URL = "http://images.cocodataset.org"
# cocodataset.org's archives: (size in bytes, MD5), as published by dataset loaders that
# verify them (e.g. cocodataset.org mirrors' md5sum lists); checked on the official host only.
# The host itself serves no checksum list (no MD5SUMS beside the zips), so none is looked for.
KNOWN_ARCHIVES: dict[str, Expected] = {
    "annotations/annotations_trainval2017.zip": Expected(252_907_541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    "zips/val2017.zip": Expected(815_585_330, "442b8da7639aecaf257c1dceb8ba8c80"),
    "zips/train2017.zip": Expected(19_336_861_798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
}


class FetchError(RuntimeError):
    """A fetch that cannot be done; the message says what was tried and what to change."""


def fetch_coco(cfg: DataConfig, out: Path, downloads: Path, *, progress: bool = True) -> None:
    """Write the COCO layout for ``cfg.train_split`` and ``cfg.val_split`` under ``out``.

    Reads data.base_url, data.max_images, data.train_split / val_split,
    data.download_workers, data.retries and data.timeout_s.
    """
    splits = (cfg.train_split, cfg.val_split)
    base = cfg.base_url.rstrip("/")
    try:
        archive = _get(cfg, f"annotations/annotations_trainval{_year(splits)}.zip", downloads, progress)
        wanted = {f"annotations/instances_{split}.json" for split in splits}
        extract_zip(archive, out, select=wanted.__contains__, progress=progress)
        missing = sorted(name for name in wanted if not (out / name).is_file())
        if missing:
            raise FetchError(f"{archive}: has no {', '.join(missing)} (data.train_split / data.val_split)")
        placed: list[tuple[Path, Path]] = []  # (downloaded image, its place in out)
        for split in splits:
            if cfg.max_images is None:
                archive = _get(cfg, f"zips/{split}.zip", downloads, progress)
                extract_zip(
                    archive, out, select=lambda name, s=split: name.startswith(f"{s}/"), progress=progress
                )
                continue
            coco = first_images(read_coco(annotation_path(out, split)), cfg.max_images)
            write_json(annotation_path(out, split), coco)
            names = [image["file_name"] for image in coco["images"]]
            download_many(
                [(f"{base}/{split}/{urllib.parse.quote(name)}", downloads / split / name) for name in names],
                workers=cfg.download_workers, timeout_s=cfg.timeout_s, retries=cfg.retries,
                desc=f"images {split}", progress=progress,
            )  # fmt: skip
            placed += [(downloads / split / name, image_dir(out, split) / name) for name in names]
        # Images leave the downloads folder only when every split is whole: a failure above
        # deletes `out`, and the next run must still find them there.
        for source, target in placed:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)
    except UnreachableError as err:
        raise FetchError(
            f"{err}. Stage fetch downloads COCO from data.base_url ({cfg.base_url}). If this machine is "
            "offline or the host is wrong: set data.base_url in params.yaml to a reachable mirror laid out "
            "like images.cocodataset.org, or use a copy on disk (data.source: local and --local-dir DIR), "
            "or the embedded synthetic set (data.source: synthetic)."
        ) from None


def _get(cfg: DataConfig, path: str, downloads: Path, progress: bool) -> Path:
    """Download ``<base_url>/<path>`` into ``downloads`` (resuming), verified where the file is known."""
    official = cfg.base_url.rstrip("/") == OFFICIAL_BASE_URL
    return download_file(
        f"{cfg.base_url.rstrip('/')}/{path}",
        downloads / Path(path).name,
        expected=KNOWN_ARCHIVES.get(path) if official else None,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        progress=progress,
    )


def _year(splits: tuple[str, ...]) -> str:
    """The COCO release year shared by the split names (``train2017``, ``val2017`` -> ``2017``)."""
    years = {match.group(1) if (match := re.fullmatch(r"[a-z]+(\d{4})", split)) else None for split in splits}
    if len(years) != 1 or None in years:
        raise FetchError(
            f"data.train_split / data.val_split {list(splits)}: data.source: coco needs COCO split names of "
            "one release, such as train2017 and val2017"
        )
    return years.pop()  # type: ignore[return-value]
