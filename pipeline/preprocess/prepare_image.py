"""One image of stage preprocess: decode, make RGB, resize to the model's scale, move its boxes.

Pure functions of bytes in, bytes out (no file system access), so they run the same in this
process, a process pool or a Ray task on another node (`pipeline.preprocess.parallel`).

Conventions:

* The resize rule is the detector's (torchvision's GeneralizedRCNNTransform, the FPN paper's
  800/1333): scale ``s = min(min_size / min(w, h), max_size / max(w, h))``; the output is
  ``round(w * s) x round(h * s)``. ``scale_x = new_w / w`` and ``scale_y = new_h / h`` are the
  exact per-axis factors, so a box in the resized frame maps back with ``x / scale_x``.
* Boxes come in as COCO ``[x, y, w, h]`` in original pixels and leave as ``[x1, y1, x2, y2]`` in
  resized pixels. They are first clipped to the image; a box with a side under
  ``MIN_BOX_SIDE`` original pixels after clipping is degenerate and dropped.
* Crowd regions (``iscrowd = 1``) go to ``crowd_boxes`` (ignored in training; the evaluation
  reads them from the original annotation file).
* EXIF orientation is ignored, as COCO's annotations are in the stored pixel frame.
* Grayscale, CMYK, palette, ... images are converted to RGB and counted as converted.
* An RGB JPEG already at the target size is passed through byte for byte (no re-encoding).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

MIN_BOX_SIDE = 1.0  # original pixels


@dataclass(frozen=True)
class ResizeSpec:
    """The target scale (the model's ``min_size``/``max_size``) and JPEG quality of the output."""

    min_size: int
    max_size: int
    jpeg_quality: int = 95


@dataclass(frozen=True)
class ObjectBox:
    """One annotation as read from COCO: ``bbox`` xywh in original pixels, contiguous ``label``."""

    x: float
    y: float
    w: float
    h: float
    label: int
    iscrowd: bool


@dataclass(frozen=True)
class ImageTask:
    """One image to prepare. ``data`` is the file's bytes (the reader checked it exists)."""

    image_id: int
    file: str  # the source path, for messages
    data: bytes
    objects: tuple[ObjectBox, ...]
    declared_size: tuple[int, int] | None  # (width, height) from the annotation file


@dataclass
class ImageResult:
    """What preparing an image gave: the JPEG and its index record, or ``None`` if skipped."""

    image_id: int
    jpeg: bytes | None
    record: dict[str, Any] | None
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "kind", "message"}
    counts: dict[str, int] = field(default_factory=dict)  # converted, boxes, crowd_boxes, boxes_clipped, ...


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(new_w, new_h)``: shorter side ``min_size`` unless the longer would pass ``max_size``."""
    scale = min(min_size / min(width, height), max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_chunk(tasks: list[ImageTask], spec: ResizeSpec) -> list[ImageResult]:
    """`prepare_image` over a list (the unit of work sent to a worker)."""
    return [prepare_image(task, spec) for task in tasks]


def prepare_image(task: ImageTask, spec: ResizeSpec) -> ImageResult:
    """Decode, convert to RGB, resize and re-encode one image; move its boxes to the new frame."""
    result = ImageResult(task.image_id, None, None)
    counts = result.counts
    try:
        image = Image.open(io.BytesIO(task.data))
        width, height = image.size
        new_w, new_h = resized_size(width, height, spec.min_size, spec.max_size)
        mode = image.mode
        if image.format == "JPEG" and (new_w * 2 <= width and new_h * 2 <= height):
            image.draft("RGB", (new_w, new_h))  # decode at 1/2, 1/4 or 1/8 scale: much faster
        image.load()  # raises on truncated or corrupt data
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        result.problems.append(problem(task.file, "corrupt_image", f"cannot decode, skipped ({err})"))
        counts["images_skipped"] = 1
        return result
    if mode != "RGB":
        counts["images_converted"] = 1
        result.problems.append(problem(task.file, "converted", f"mode {mode} converted to RGB"))
    if task.declared_size is not None and task.declared_size != (width, height):
        counts["size_mismatches"] = 1
        result.problems.append(
            problem(
                task.file, "size_mismatch",
                f"annotation says {task.declared_size[0]}x{task.declared_size[1]}, file is {width}x{height}; "
                "boxes taken as in the file's frame",
            )
        )  # fmt: skip
    if (width, height) == (new_w, new_h) and mode == "RGB" and image.format == "JPEG":
        jpeg = task.data  # already at scale: keep the original bytes (no second JPEG loss)
    else:
        if image.size != (new_w, new_h):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=spec.jpeg_quality)
        jpeg = buffer.getvalue()
    scale_x, scale_y = new_w / width, new_h / height

    boxes: list[list[float]] = []
    labels: list[int] = []
    crowd: list[list[float]] = []
    for obj in task.objects:
        x1, y1 = max(obj.x, 0.0), max(obj.y, 0.0)
        x2, y2 = min(obj.x + obj.w, float(width)), min(obj.y + obj.h, float(height))
        if (x1, y1, x2, y2) != (obj.x, obj.y, obj.x + obj.w, obj.y + obj.h):
            _count(counts, "boxes_clipped")
        if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
            _count(counts, "boxes_dropped")
            result.problems.append(
                problem(task.file, "degenerate_box", f"box {[obj.x, obj.y, obj.w, obj.h]} (xywh) dropped")
            )
            continue
        resized = [_r(x1 * scale_x), _r(y1 * scale_y), _r(x2 * scale_x), _r(y2 * scale_y)]
        if obj.iscrowd:
            crowd.append(resized)
        else:
            boxes.append(resized)
            labels.append(obj.label)
    counts["boxes"] = len(boxes)
    counts["crowd_boxes"] = len(crowd)
    counts["images_written"] = 1
    result.jpeg = jpeg
    result.record = {
        "image_id": task.image_id,
        "file": f"images/{task.image_id}.jpg",
        "orig_width": width,
        "orig_height": height,
        "width": new_w,
        "height": new_h,
        "scale_x": scale_x,
        "scale_y": scale_y,
        "boxes": boxes,
        "labels": labels,
        "crowd_boxes": crowd,
        "aspect_ratio": new_w / new_h,
    }
    return result


def _r(value: float) -> float:
    return round(value, 2)


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def problem(file: str, kind: str, message: str) -> dict[str, str]:
    """A report entry: ``{"file", "kind", "message"}``, the message starting with the file."""
    return {"file": file, "kind": kind, "message": f"{file}: {message}"}
