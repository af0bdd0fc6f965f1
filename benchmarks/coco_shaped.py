"""A COCO-shaped dataset at any size: COCO's counts and categories, tiny pictures.

    .venv/bin/python benchmarks/coco_shaped.py --out /tmp/coco-shaped               # 118,287 train + 5,000 val
    .venv/bin/python benchmarks/coco_shaped.py --out /tmp/cs --train 1000 --val 200 --workers 2

Writes the layout of `pipeline.coco_format` (``annotations/instances_<split>.json`` and
``<split>/<file_name>``), which stage fetch copies with ``data.source: local`` and
``--local-dir``. What is COCO's and what is not:

* COCO's: the image counts (train2017 118,287, val2017 5,000 by default), about 7.3 boxes per
  image (1% of the images empty, the rest 1 + a negative binomial count, mean 6.37, variance
  about 27: COCO's long tail; at most 100), the 80 categories with their real ids (1..90 without
  12, 26, 29, 30, 45, 66, 68, 69, 71, 83) and names, about 1% crowd annotations (``iscrowd: 1``,
  an uncompressed RLE ``segmentation``), random non-contiguous image ids, 12-digit file names,
  and a polygon ``segmentation`` of 4 + Poisson(20) points per object, so that an annotation
  takes about as many bytes of JSON as COCO's (~0.5 kB).
* Not COCO's: the pictures are 64x48 (landscape, 70%) or 48x64 (portrait) JPEGs of flat
  rectangles (about 1 kB each: 118k images take a few hundred MB, mostly file-system blocks),
  and box sides are log-uniform between 2 px and the image side.

Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_code, i])``, so the
files depend only on (seed, split, index); the image ids come from one permutation seeded by
``seed``. Images are written by a process pool (``workers``; 0 = every core) with a tqdm bar.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

# COCO 2017's 80 categories: id -> name (ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}  # fmt: skip
CATEGORY_IDS = tuple(COCO_CATEGORIES)
COCO_TRAIN_IMAGES = 118_287
COCO_VAL_IMAGES = 5_000
SIZES = ((64, 48), (48, 64))  # (width, height): landscape, portrait
LANDSCAPE_FRACTION = 0.7
EMPTY_FRACTION = 0.01
EXTRA_BOXES_MEAN = 6.37  # 0.99 * (1 + 6.37) = 7.3 boxes per image
EXTRA_BOXES_SHAPE = 2.0  # negative binomial shape: variance = mean + mean^2 / shape
MAX_BOXES = 100
CROWD_FRACTION = 0.01
POLYGON_POINTS_MEAN = 20  # 4 + Poisson(20) points per polygon
MIN_SIDE = 2.0  # px
JPEG_QUALITY = 85
SPLIT_CODES = {"train": 0, "val": 1}
CHUNK = 256  # images per pool task
DONE_MARKER = ".coco_shaped_done"  # written last: a folder without it is incomplete


def split_code(split: str) -> int:
    """0 for a train split, 1 for a val split (by the name's prefix, e.g. ``train2017``)."""
    for prefix, code in SPLIT_CODES.items():
        if split.startswith(prefix):
            return code
    return 2 + sum(split.encode())  # any other name: its own stream


def draw_image(seed: int, code: int, index: int) -> tuple[int, int, bytes, list[dict[str, Any]]]:
    """Image ``index`` of a split: ``(width, height, JPEG bytes, annotations without ids)``."""
    rng = np.random.default_rng([seed, code, index])
    width, height = SIZES[0] if rng.random() < LANDSCAPE_FRACTION else SIZES[1]
    if rng.random() < EMPTY_FRACTION:
        count = 0
    else:
        p = EXTRA_BOXES_SHAPE / (EXTRA_BOXES_SHAPE + EXTRA_BOXES_MEAN)
        count = min(MAX_BOXES, 1 + int(rng.negative_binomial(EXTRA_BOXES_SHAPE, p)))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    annotations = []
    for _ in range(count):
        w, h = np.exp(rng.uniform(np.log(MIN_SIDE), np.log([width, height])))
        x, y = rng.uniform(0, 1, size=2) * [width - w, height - h]
        category = CATEGORY_IDS[int(rng.integers(len(CATEGORY_IDS)))]
        crowd = bool(rng.random() < CROWD_FRACTION)
        x0, y0, x1, y1 = int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))
        pixels[y0:y1, x0:x1] = (category * 37 % 256, category * 91 % 256, category * 53 % 256)
        bbox = [round(float(v), 2) for v in (x, y, w, h)]
        annotations.append(
            {
                "image_id": None,  # filled in by the caller
                "category_id": category,
                "bbox": bbox,
                "area": round(float(w * h), 2),
                "iscrowd": int(crowd),
                "segmentation": _crowd_rle(bbox, width, height) if crowd else [_polygon(rng, bbox)],
            }
        )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return width, height, buffer.getvalue(), annotations


def _polygon(rng: np.random.Generator, bbox: list[float]) -> list[float]:
    """Points on the ellipse inscribed in the ``[x, y, w, h]`` box, flattened ``[x0, y0, x1, y1, ...]``."""
    x, y, w, h = bbox
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=4 + int(rng.poisson(POLYGON_POINTS_MEAN))))
    xs = x + w / 2 * (1 + np.cos(angles))
    ys = y + h / 2 * (1 + np.sin(angles))
    return [round(float(v), 2) for v in np.stack([xs, ys], axis=1).ravel()]


def _crowd_rle(bbox: list[float], width: int, height: int) -> dict[str, Any]:
    """The box as COCO's uncompressed RLE (``counts`` of alternating 0/1 runs, column-major)."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = 1
    flat = mask.ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
    return {"counts": counts, "size": [height, width]}


def _write_chunk(
    folder: str, seed: int, code: int, indices: list[int], image_ids: list[int]
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Write the JPEGs of ``indices``; return each image's entry and annotations (pool task)."""
    out = []
    for index, image_id in zip(indices, image_ids, strict=True):
        width, height, jpeg, annotations = draw_image(seed, code, index)
        file_name = f"{image_id:012d}.jpg"
        Path(folder, file_name).write_bytes(jpeg)
        for annotation in annotations:
            annotation["image_id"] = image_id
        out.append(({"id": image_id, "file_name": file_name, "width": width, "height": height}, annotations))
    return out


def generate_coco_shaped(
    out: str | Path,
    *,
    train_images: int = COCO_TRAIN_IMAGES,
    val_images: int = COCO_VAL_IMAGES,
    seed: int = 0,
    train_split: str = "train2017",
    val_split: str = "val2017",
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Write the dataset into ``out`` (which must not exist; built beside it and renamed when complete).

    Returns ``out``. See the module docstring for what is drawn.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    if train_images < 1 or val_images < 1:
        raise ValueError(f"need at least one image per split, got {train_images} train, {val_images} val")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ids = np.random.default_rng(seed).permutation(10 * (train_images + val_images))[
        : train_images + val_images
    ]
    ids = (ids + 1).tolist()  # non-contiguous, unique over both splits, as COCO's
    workers = workers or len(os.sched_getaffinity(0))
    categories = [{"id": i, "name": name} for i, name in COCO_CATEGORIES.items()]
    counts: dict[str, int] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for split, count, split_ids in (
            (train_split, train_images, ids[:train_images]),
            (val_split, val_images, ids[train_images:]),
        ):
            folder = tmp / split
            folder.mkdir(parents=True)
            code = split_code(split)
            starts = range(0, count, CHUNK)
            jobs = [
                pool.submit(
                    _write_chunk, str(folder), seed, code, list(range(s, min(s + CHUNK, count))),
                    split_ids[s : s + CHUNK],
                )
                for s in starts
            ]  # fmt: skip
            images, annotations = [], []
            with tqdm(total=count, desc=f"generate {split}", unit="img", disable=not progress) as bar:
                for job in jobs:  # in order: the files and ids do not depend on scheduling
                    for image, image_annotations in job.result():
                        images.append(image)
                        for annotation in image_annotations:
                            annotations.append({"id": len(annotations) + 1, **annotation})
                        bar.update(1)
            coco = {
                "info": {"description": f"COCO-shaped benchmark data (seed {seed}), not COCO"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            path = tmp / "annotations" / f"instances_{split}.json"
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(coco, separators=(",", ":")))
            counts[split] = len(annotations)
    (tmp / DONE_MARKER).write_text(
        json.dumps(
            {"train_images": train_images, "val_images": val_images, "seed": seed, "annotations": counts}
        )
        + "\n"
    )
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/coco_shaped.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    p.add_argument("--train", type=int, default=COCO_TRAIN_IMAGES, help="train images (default COCO's)")
    p.add_argument("--val", type=int, default=COCO_VAL_IMAGES, help="val images (default COCO's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train2017")
    p.add_argument("--val-split", default="val2017")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = every core)")
    args = p.parse_args(argv)
    try:
        generate_coco_shaped(
            args.out, train_images=args.train, val_images=args.val, seed=args.seed,
            train_split=args.train_split, val_split=args.val_split, workers=args.workers,
        )  # fmt: skip
    except (FileExistsError, ValueError) as err:
        print(f"coco_shaped: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.train} train and {args.val} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
