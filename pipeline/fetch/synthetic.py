"""The embedded default dataset: filled shapes at many scales, written as COCO.

``data.synthetic_kind: shapes`` (the default) is described here; ``context`` (small objects
whose class only their surroundings tell) is `pipeline.fetch.synthetic_context`, drawn with
this module's primitives (`background`, `make_shape`, `paint`) and written by the same
`generate_synthetic`.

A deterministic generator (numpy + PIL only) for trying the whole pipeline in minutes on a
CPU. Each image is a textured, noisy background with 0..~9 filled shapes of three classes:

=========  ===========  ===========================================
category   COCO id      cue
=========  ===========  ===========================================
circle     2            shape; hue near red in 3 of 4 objects
square     5            shape (rotated up to 25 deg); hue near green
triangle   9            shape (any rotation); hue near blue
=========  ===========  ===========================================

The ids are deliberately non-contiguous (and differ from the contiguous labels 1..3), so a
pipeline that confuses COCO category ids with labels fails on it. Object sizes (the side of
the tight box) are drawn in three bands: small 8-24 px (most objects: they need the fine
pyramid levels), medium 24-64 px and large 64 px up to 3/4 of the shorter image side (no
large object in images whose shorter side is under 86 px, as 3/4 of it is under 64 px; the
smallest accepted side, 64 px, keeps small and medium objects up to 48 px).
Objects do not overlap (boxes keep a 2 px gap), their colour stands out from the background
under them (MIN_CONTRAST), about 8% of the images are empty, and faint line and ring
outlines act as distractors. Shapes are antialiased (4x supersampled) and the
whole image gets pixel noise, then JPEG compression.

Image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``, so each
image depends only on (data.seed, split, index): the same seed gives byte-identical files.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.coco_format import annotation_path, image_dir, write_json
from pipeline.config import DataConfig

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 5, "name": "square", "supercategory": "shape"},
    {"id": 9, "name": "triangle", "supercategory": "shape"},
)
CLASS_HUE = {"circle": 0.0, "square": 1 / 3, "triangle": 0.62}
SIZE_BANDS = ((8.0, 24.0), (24.0, 64.0), (64.0, None))  # px; None = 3/4 of the shorter side
EMPTY_FRACTION = 0.08
SUPERSAMPLE = 4
MIN_CONTRAST = 40.0  # mean |RGB difference| between a shape and the background under it
JPEG_QUALITY = 90
LICENSE = {
    "id": 1,
    "name": "CC0 1.0 (generated)",
    "url": "https://creativecommons.org/publicdomain/zero/1.0/",
}


@dataclass(frozen=True)
class Shape:
    """One object: its class, polygon outline (image pixels) and exact area."""

    name: str
    polygon: np.ndarray  # (V, 2) x, y
    area: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Tight box ``(x1, y1, x2, y2)``."""
        (x1, y1), (x2, y2) = self.polygon.min(0), self.polygon.max(0)
        return float(x1), float(y1), float(x2), float(y2)


DrawImage = Callable[[np.random.Generator, int, int], tuple[np.ndarray, list[Shape]]]


def generate_synthetic(cfg: DataConfig, out: str | Path, *, progress: bool = True) -> None:
    """Write the COCO layout (``annotations/instances_<split>.json``, ``<split>/*.jpg``) under ``out``.

    Reads data.seed, data.synthetic_kind, data.train_split / val_split, data.synthetic_train_images /
    synthetic_val_images and data.synthetic_width / synthetic_height.
    """
    out = Path(out)
    categories, draw = synthetic_kind(cfg.synthetic_kind)
    splits = ((cfg.train_split, cfg.synthetic_train_images), (cfg.val_split, cfg.synthetic_val_images))
    for split_index, (split, count) in enumerate(splits):
        folder = image_dir(out, split)
        folder.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in tqdm(range(count), desc=f"synthetic {split}", disable=not progress, leave=False):
            rng = np.random.default_rng([cfg.seed, split_index, i])
            image_id = split_index * 1_000_000 + i + 1
            file_name = f"{image_id:012d}.jpg"
            pixels, shapes = draw(rng, cfg.synthetic_width, cfg.synthetic_height)
            Image.fromarray(pixels).save(folder / file_name, quality=JPEG_QUALITY)
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": cfg.synthetic_width,
                    "height": cfg.synthetic_height,
                    "license": 1,
                }
            )
            for shape in shapes:
                annotations.append(
                    _annotation(shape, categories, image_id, split_index * 10_000_000 + len(annotations) + 1)
                )
        coco = {
            "info": {
                "description": f"FPN pipeline synthetic data ({cfg.synthetic_kind})",
                "version": "1.0",
                "year": 2017,
                "contributor": "pipeline.fetch.synthetic",
                "seed": cfg.seed,
            },
            "licenses": [LICENSE],
            "images": images,
            "annotations": annotations,
            "categories": [dict(c) for c in categories],
        }
        write_json(annotation_path(out, split), coco)


def synthetic_kind(kind: str) -> tuple[tuple[dict[str, Any], ...], DrawImage]:
    """The categories and the image drawer of ``data.synthetic_kind``: ``shapes`` (this module,
    the default) or ``context`` (`pipeline.fetch.synthetic_context`)."""
    if kind == "context":
        from pipeline.fetch import synthetic_context  # it builds on this module's drawing

        return synthetic_context.CATEGORIES, synthetic_context.draw_image
    if kind == "shapes":
        return CATEGORIES, draw_image
    raise ValueError(f"data.synthetic_kind: must be shapes or context, got {kind!r}")


def _annotation(
    shape: Shape, categories: tuple[dict[str, Any], ...], image_id: int, ann_id: int
) -> dict[str, Any]:
    x1, y1, x2, y2 = shape.box
    category_id = next(c["id"] for c in categories if c["name"] == shape.name)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": round(shape.area, 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in shape.polygon.reshape(-1)]],
    }


def draw_image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Shape]]:
    """One image (uint8 ``(H, W, 3)``) and the shapes drawn on it."""
    canvas = background(rng, width, height)
    shapes = [] if rng.random() < EMPTY_FRACTION else _place_shapes(rng, width, height)
    for shape in shapes:
        paint(canvas, shape, visible_colour(rng, shape, canvas))
    canvas += rng.normal(0.0, 6.0, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), shapes


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-saturation base colour, smooth blotches, and faint distractor outlines; float (H, W, 3)."""
    base = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8))) * 255
    grid = rng.normal(0.0, 22.0, (height // 24 + 2, width // 24 + 2, 3)).astype(np.float32)
    blotches = np.stack(
        [np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BICUBIC)) for c in range(3)],
        -1,
    )
    canvas = np.clip(base + blotches, 0, 255).astype(np.float32)
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(0, 4)):
        x, y = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
        if rng.random() < 0.5:
            draw.line([(x[0], y[0]), (x[1], y[1])], fill=255, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(10, min(width, height) / 3)
            draw.ellipse([x[0] - r, y[0] - r, x[0] + r, y[0] + r], outline=255, width=int(rng.integers(1, 3)))
    alpha = np.asarray(layer, np.float32)[..., None] / 255.0 * rng.uniform(0.15, 0.35)
    tone = rng.uniform(0, 255, 3).astype(np.float32)
    return canvas * (1 - alpha) + tone * alpha


def _place_shapes(rng: np.random.Generator, width: int, height: int) -> list[Shape]:
    """Large shapes first, then medium, then small ones in the space left; no two boxes touch."""
    largest = 0.75 * min(width, height)
    counts = (
        int(rng.integers(1, 7)),
        int(rng.integers(0, 3)),
        int(rng.random() < 0.6),
    )  # small, medium, large
    boxes: list[tuple[float, float, float, float]] = []
    shapes: list[Shape] = []
    for (low, high), count in reversed(list(zip(SIZE_BANDS, counts, strict=True))):
        high = largest if high is None else min(high, largest)
        if high <= low:  # sides under ~86 px: no room for the large band (its count is still drawn)
            continue
        for _ in range(count):
            size = math.exp(rng.uniform(math.log(low), math.log(high)))
            name = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["name"]
            for _attempt in range(30):
                shape = make_shape(rng, name, size, rng.uniform(0, width), rng.uniform(0, height))
                x1, y1, x2, y2 = shape.box
                inside = x1 >= 1 and y1 >= 1 and x2 <= width - 1 and y2 <= height - 1
                if inside and not any(boxes_near(shape.box, other, 2.0) for other in boxes):
                    boxes.append(shape.box)
                    shapes.append(shape)
                    break
    return shapes


def boxes_near(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def make_shape(rng: np.random.Generator, name: str, size: float, cx: float, cy: float) -> Shape:
    """A shape whose tight box has longer side ``size``, centred near ``(cx, cy)``."""
    if name == "circle":
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], 1) * 0.5
        return Shape(name, unit * size + (cx, cy), math.pi * (size / 2) ** 2)
    if name == "square":
        theta = math.radians(rng.uniform(-25, 25))
        corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    else:
        theta = rng.uniform(0, 2 * math.pi)
        angles = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        corners = np.stack([np.cos(angles), np.sin(angles)], 1)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polygon = corners @ rotation.T
    polygon = polygon / (polygon.max(0) - polygon.min(0)).max() * size  # longer box side = size
    polygon = polygon - (polygon.max(0) + polygon.min(0)) / 2 + (cx, cy)
    x, y = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return Shape(name, polygon, area)


def visible_colour(rng: np.random.Generator, shape: Shape, canvas: np.ndarray) -> np.ndarray:
    """A `_colour` that differs from the background under the shape by at least MIN_CONTRAST (a few tries)."""
    x1, y1, x2, y2 = (int(v) for v in shape.box)
    background = canvas[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).mean(0)
    for _ in range(8):
        colour = _colour(rng, shape.name)
        if np.abs(colour - background).mean() >= MIN_CONTRAST:
            break
    return colour


def _colour(rng: np.random.Generator, name: str) -> np.ndarray:
    """RGB 0..255: the class hue (jittered) in 3 of 4 objects, any hue otherwise."""
    hue = (CLASS_HUE[name] + rng.normal(0, 0.05)) % 1.0 if rng.random() < 0.75 else rng.random()
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))) * 255


def paint(canvas: np.ndarray, shape: Shape, colour: np.ndarray) -> None:
    """Alpha-blend the antialiased shape into ``canvas`` (float (H, W, 3)) in place."""
    x1, y1, x2, y2 = shape.box
    left, top = int(math.floor(x1)), int(math.floor(y1))
    right, bottom = int(math.ceil(x2)) + 1, int(math.ceil(y2)) + 1
    mask = Image.new("L", ((right - left) * SUPERSAMPLE, (bottom - top) * SUPERSAMPLE), 0)
    points = [((x - left) * SUPERSAMPLE, (y - top) * SUPERSAMPLE) for x, y in shape.polygon]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    alpha = np.asarray(mask.resize((right - left, bottom - top), Image.BOX), np.float32)[..., None] / 255.0
    patch = canvas[top:bottom, left:right]
    patch *= 1 - alpha[: patch.shape[0], : patch.shape[1]]
    patch += colour * alpha[: patch.shape[0], : patch.shape[1]]
