"""Stage preprocess's machinery: a COCO-layout folder into the sharded training format of `pipeline.dataset`.

Output (built in a temporary sibling of ``out``, renamed when complete; for an object-store
``out`` such as ``s3://bucket/prefix``, built in a local temporary folder and uploaded, the files
that mark it complete last)::

    <out>/<split>/shard-00000.parquet, ...  one row per image: the original JPEG bytes and boxes
    <out>/<split>/index.parquet             image_id, width, height, shard, row, num_boxes per image
    <out>/<split>/split.json                {"split", "annotation_file", "shards": [names], "images": N}
    <out>/categories.json                   [{"label": 1, "id": <COCO id>, "name": ...}, ...]
    <out>/report.json                       counts per split, and every problem found, per file
    <out>/manifest.json                     {"data_hash": sha256 of every split's files + categories, ...}

The columns, and why Parquet, are in `pipeline.dataset`; the conventions of a row (original
pixels, flat xyxy boxes, what is converted) in `pipeline.preprocess.prepare_image`. Images are
not resized: the detector's transform resizes, so its detections are in the original pixels of
the annotation file, which stays the ground truth for evaluation (``annotation_file``, its path
as given). A split has ceil(images / ``preprocess.images_per_shard``) shards, written in image
order by this process from the rows the workers prepare.

Labels: the categories of all splits' files, sorted by COCO id, numbered 1..K (0 is the
background).

Bad input: a structurally malformed annotation file, conflicting categories, or a split
with no usable image raise `PreprocessError`/`CocoFormatError` naming the file. Everything
smaller is reported and skipped: an annotation with a malformed ``bbox``, an unknown image
or category (the annotation); a missing, unreadable, truncated or corrupt image, one over
``preprocess.max_pixels`` or whose header size differs from the annotation file's
``width``/``height`` (the image); a box outside the image (clipped; dropped if degenerate).
Grayscale/CMYK/16-bit/PNG images are converted to RGB JPEGs, not skipped.

A worker process that dies (e.g. killed for memory) raises `PreprocessCrash`, naming the
images it may have held and how to rerun; nothing is written.

Where it runs: ``preprocess.workers`` local processes, or Ray tasks when ``preprocess.use_ray``
is true (on the cluster at ``RAY_ADDRESS``, else a local one); ``RAY_ADDRESS`` alone does not
switch. The choice is logged, naming ``RAY_ADDRESS`` when it is set and not used.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.cluster import available_cores
from pipeline.coco_format import annotation_path, image_dir, read_coco, write_json
from pipeline.config import PreprocessConfig
from pipeline.dataset import SPLIT_FILE, completion_files, files_sha256
from pipeline.io import atomic_directory, check_output_folder
from pipeline.preprocess.parallel import WorkerDied, describe_backend, ordered_map
from pipeline.preprocess.prepare_image import ImageSpec, ImageTask, ObjectBox, prepare_chunk, problem
from pipeline.preprocess.shards import SplitWriter
from pipeline.storage import check_output_location, is_uri, upload_folder

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 10_000  # report.json lists at most this many; the counts stay complete
SHOWN_IN_FLIGHT = 50  # images named when a worker dies; the dead one held one of the first chunks
COUNT_KEYS = (
    "images_listed", "images_written", "images_skipped", "images_missing", "images_converted",
    "images_too_large", "size_mismatches", "annotations", "annotations_skipped", "boxes",
    "crowd_boxes", "boxes_clipped", "boxes_dropped",
)  # fmt: skip


class PreprocessError(RuntimeError):
    """A dataset that cannot be preprocessed at all; the message names the file."""


class PreprocessCrash(RuntimeError):
    """A worker died (not bad input); the message names the images in flight and how to rerun."""


@dataclass(frozen=True)
class PreprocessSummary:
    """What a run wrote: the data hash, per-split counts and the problems (as in report.json)."""

    data_hash: str
    num_classes: int
    counts: dict[str, dict[str, int]]
    problems: list[dict[str, str]]


def preprocess_dataset(
    coco_root: str | Path,
    out: str | Path,
    *,
    splits: tuple[str, ...],
    cfg: PreprocessConfig,
    force: bool = False,
    progress: bool = True,
) -> PreprocessSummary:
    """Write the preprocessed format for ``splits`` of ``coco_root`` into ``out`` (see the module docstring).

    Reads every key of ``cfg`` (preprocess.workers, jpeg_quality, max_pixels, images_per_shard,
    use_ray: Ray tasks at RAY_ADDRESS only when true; the choice is logged).
    """
    if is_uri(str(out)):
        return _preprocess_to_uri(coco_root, str(out), splits=splits, cfg=cfg, force=force, progress=progress)
    coco_root = Path(coco_root)
    check_output_folder(out, "preprocess", force=force, inputs=[coco_root])  # before any work
    cocos = {split: read_coco(annotation_path(coco_root, split)) for split in splits}
    categories = contiguous_categories({annotation_path(coco_root, s): c for s, c in cocos.items()})
    workers = cfg.workers or available_cores()
    hint = "" if cfg.use_ray else " (preprocess.use_ray: true runs it as Ray tasks)"
    log.info("preprocess: %s%s", describe_backend(cfg.use_ray, workers), hint)
    run = _Run(
        ImageSpec(cfg.jpeg_quality, cfg.max_pixels), cfg.images_per_shard, workers, cfg.use_ray, progress
    )
    counts: dict[str, dict[str, int]] = {}
    problems: list[dict[str, str]] = []
    hashed: list[Path] = []
    with atomic_directory(out, stage="preprocess", force=force, inputs=[coco_root]) as tmp:
        for split in splits:
            writer = SplitWriter(
                tmp / split, split=split, annotation_file=str(annotation_path(coco_root, split)),
                images_per_shard=cfg.images_per_shard,
            )  # fmt: skip
            counts[split], split_problems = _prepare_split(
                coco_root, split, cocos[split], categories, run, writer
            )
            problems.extend({"split": split, **p} for p in split_problems)
            if not len(writer):
                shown = "; ".join(p["message"] for p in split_problems[:3])
                raise PreprocessError(
                    f"{annotation_path(coco_root, split)}: no usable image in split {split!r} "
                    f"({counts[split]['images_listed']} listed, all skipped){': ' + shown if shown else ''}"
                )
            hashed.extend(writer.close())
        write_json(tmp / "categories.json", categories, indent=2)
        data_hash = files_sha256([*hashed, tmp / "categories.json"])
        write_json(
            tmp / "report.json",
            {
                "counts": counts,
                "problems": problems[:MAX_LISTED_PROBLEMS],
                "problems_not_listed": max(0, len(problems) - MAX_LISTED_PROBLEMS),
            },
            indent=2,
        )
        write_json(
            tmp / "manifest.json",
            {
                "data_hash": data_hash,
                "splits": {
                    s: {"split": f"{s}/{SPLIT_FILE}", "images": counts[s]["images_written"]} for s in splits
                },
                "num_classes": len(categories),
                "images_per_shard": cfg.images_per_shard,
                "jpeg_quality": cfg.jpeg_quality,
                "coco_root": str(coco_root),
            },
            indent=2,
        )
    return PreprocessSummary(data_hash, len(categories), counts, problems)


def _preprocess_to_uri(
    coco_root: str | Path,
    out: str,
    *,
    splits: tuple[str, ...],
    cfg: PreprocessConfig,
    force: bool,
    progress: bool,
) -> PreprocessSummary:
    """`preprocess_dataset` into object storage: built whole in a local temporary folder (``$TMPDIR``),
    then uploaded with each ``split.json``, ``categories.json`` and ``manifest.json`` last
    (`pipeline.storage.upload_folder`): readers open those first, so a half-done upload reads as absent."""
    check_output_location(out, "preprocess", force=force)  # before any work
    with tempfile.TemporaryDirectory(prefix="fpn-preprocess-") as tmp:
        local = Path(tmp) / "preprocessed"
        summary = preprocess_dataset(coco_root, local, splits=splits, cfg=cfg, progress=progress)
        count = upload_folder(local, out, last=completion_files(splits), progress=progress)
    log.info("preprocess: uploaded %d files to %s", count, out)
    return summary


def contiguous_categories(cocos: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"label": 1..K, "id", "name"}]``: the union of the files' categories sorted by COCO id."""
    by_id: dict[int, tuple[str, Path]] = {}
    for path, coco in cocos.items():
        for category in coco["categories"]:
            seen = by_id.setdefault(category["id"], (category["name"], path))
            if seen[0] != category["name"]:
                raise PreprocessError(
                    f"{path}: category id {category['id']} is {category['name']!r}, but {seen[0]!r} in {seen[1]}"
                )
    if not by_id:
        raise PreprocessError(f"{', '.join(map(str, cocos))}: no categories")
    return [{"label": i + 1, "id": cid, "name": by_id[cid][0]} for i, cid in enumerate(sorted(by_id))]


@dataclass(frozen=True)
class _Run:
    """How a run prepares images: the per-image spec, shard size, parallelism and the progress bar."""

    spec: ImageSpec
    images_per_shard: int
    workers: int
    use_ray: bool
    progress: bool


def _prepare_split(
    coco_root: Path,
    split: str,
    coco: dict[str, Any],
    categories: list[dict[str, Any]],
    run: _Run,
    writer: SplitWriter,
) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Prepare one split's images into ``writer``, in order; return its counts and problems."""
    ann_file = annotation_path(coco_root, split)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["images_listed"] = len(coco["images"])
    counts["annotations"] = len(coco["annotations"])
    problems: list[dict[str, str]] = []
    objects = _read_objects(ann_file, coco, {c["id"]: c["label"] for c in categories}, problems)
    counts["annotations_skipped"] = len(problems)
    bar = tqdm(total=len(coco["images"]), desc=f"preprocess {split}", unit="img", disable=not run.progress)

    def tasks() -> Iterator[ImageTask]:
        for image in coco["images"]:
            path = image_dir(coco_root, split) / image["file_name"]
            try:
                data = path.read_bytes()
            except OSError as err:
                reason = "file not found" if isinstance(err, FileNotFoundError) else f"cannot read ({err})"
                problems.append(
                    problem(str(path), "missing_image", f"{reason} (listed in {ann_file}), skipped")
                )
                counts["images_missing"] += 1
                counts["images_skipped"] += 1
                bar.update(1)
                continue
            yield ImageTask(
                image_id=image["id"],
                file=str(path),
                data=data,
                objects=tuple(objects.get(image["id"], ())),
                declared_size=_declared_size(image),
            )

    chunk = max(1, min(16, len(coco["images"]) // (4 * run.workers)))
    results = ordered_map(
        prepare_chunk, _chunks(tasks(), chunk), run.spec, workers=run.workers, use_ray=run.use_ray
    )
    try:
        with bar:
            for prepared in results:
                for result in prepared:
                    problems.extend(result.problems)
                    for key, value in result.counts.items():
                        counts[key] += value
                    if result.row is not None:
                        writer.add(result.row)
                bar.update(len(prepared))
    except WorkerDied as err:
        raise PreprocessCrash(_crash_message(ann_file, image_dir(coco_root, split), err.chunks)) from err
    return counts, problems


def _declared_size(image: dict[str, Any]) -> tuple[int, int] | None:
    """``(width, height)`` from the annotation file, or None unless both are integers (not bools)."""
    declared = (image.get("width"), image.get("height"))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in declared):
        return declared  # type: ignore[return-value]
    return None


def _crash_message(ann_file: Path, folder: Path, chunks: list[list[ImageTask]]) -> str:
    """The images not finished when a worker died (in submission order: the first chunks were the
    running ones, one held the culprit) and how to find it; names relative to the split's ``folder``."""
    names = [str(Path(task.file).relative_to(folder)) for chunk in chunks for task in chunk]
    more = len(names) - SHOWN_IN_FLIGHT
    shown = ", ".join(names[:SHOWN_IN_FLIGHT]) + (f" and {more} more" if more > 0 else "")
    return (
        f"{ann_file}: a preprocess worker died (killed, e.g. out of memory, or crashed) while preparing one "
        f"of these {len(names)} unfinished images of {folder} (the first ones were running): {shown}. "
        "Nothing was written. Rerun with preprocess.workers: 1 to find the image (the progress bar stops "
        "at it), or lower preprocess.max_pixels if memory ran out"
    )


def _read_objects(
    ann_file: Path, coco: dict[str, Any], label_of: dict[int, int], problems: list[dict[str, str]]
) -> dict[int, list[ObjectBox]]:
    """Annotations grouped by image id; each unusable one becomes a problem and is skipped."""
    objects: dict[int, list[ObjectBox]] = {image["id"]: [] for image in coco["images"]}
    for i, ann in enumerate(coco["annotations"]):
        where = f"annotations[{i}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict) else "")
        kind, reason = _annotation_problem(ann, objects, label_of)
        if reason:
            problems.append(problem(str(ann_file), kind, f"{where}: {reason}, skipped"))
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        objects[ann["image_id"]].append(
            ObjectBox(x, y, w, h, label_of[ann["category_id"]], bool(ann.get("iscrowd", 0)))
        )
    return objects


def _annotation_problem(
    ann: Any, objects: dict[int, Any], label_of: dict[int, int]
) -> tuple[str, str | None]:
    if not isinstance(ann, dict):
        return "bad_annotation", f"not an object ({ann!r:.60})"
    bbox = ann.get("bbox")
    if not (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        return "bad_annotation", f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r:.80}"
    image_id, category_id = ann.get("image_id"), ann.get("category_id")
    if not isinstance(image_id, int) or image_id not in objects:
        return "annotation_without_image", f"image_id {image_id!r} is not in 'images'"
    if not isinstance(category_id, int) or category_id not in label_of:
        return "unknown_category", f"category_id {category_id!r} is not in 'categories'"
    return "", None


def _chunks(items: Iterator[ImageTask], size: int) -> Iterator[list[ImageTask]]:
    while batch := list(islice(items, size)):
        yield batch
