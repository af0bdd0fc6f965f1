"""One image of stage preprocess: verify it, keep its bytes (or convert it to an RGB JPEG), check its boxes.

Pure functions of bytes in, a shard row out (no file system access), so they run the same in
this process, a process pool or a Ray task on another node (`pipeline.preprocess.parallel`).

Conventions:

* Images are not resized (the detector's transform does that, as COCO's evaluation protocol
  does in memory). An RGB JPEG is stored byte for byte, after one full decode to verify it.
  Anything else (grayscale, CMYK, palette, 16-bit, PNG, ...) is converted to RGB and encoded as
  JPEG at ``jpeg_quality``, counted as converted, so every stored image is what
  ``torchvision.io.decode_jpeg`` reads as RGB. 16-bit grey (PIL modes ``I;16*``, and ``I`` as
  some decoders give it) is scaled by 1/257 (65535 -> 255), not clipped (which made it white).
* Boxes come in as COCO ``[x, y, w, h]`` in original pixels and leave as flat ``x1, y1, x2, y2``
  in the same pixels. They are first clipped to the image; a box with a side under
  ``MIN_BOX_SIDE`` pixels after clipping is degenerate and dropped.
* Crowd regions (``iscrowd = 1``) go to ``crowd_boxes`` (ignored in training; the evaluation
  reads them from the original annotation file).
* EXIF orientation is ignored, as COCO's annotations are in the stored pixel frame.
* Checked from the header, before anything is decoded (PIL's ``Image.open`` reads only the
  header): an image over ``ImageSpec.max_pixels`` (``preprocess.max_pixels``), or over PIL's
  own decompression-bomb limit, is skipped (``too_large``); so is one whose size differs from
  the annotation file's ``width``/``height`` (``size_mismatch``): a forged or wrong header
  decodes as a flat grey picture, and the boxes would not fit it. Without ``width``/``height``
  in the annotation file that second check cannot be made. A truncated or corrupt image fails
  the decode and is skipped (``corrupt_image``).
* Skipped images are counted in ``images_skipped`` and in their own count
  (``images_too_large``, ``size_mismatches``), and reported as problems; none raises.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import PreprocessConfig

MIN_BOX_SIDE = 1.0  # original pixels
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # PIL modes of 16-bit grey
SIXTEEN_TO_EIGHT_BITS = 257  # 65535 / 255
DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises for truncated or corrupt data


@dataclass(frozen=True)
class ImageSpec:
    """JPEG quality for converted images, and the size cap."""

    jpeg_quality: int = 95
    max_pixels: int = PreprocessConfig.max_pixels  # width x height; larger images are skipped


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
    """What preparing an image gave: its shard row (`pipeline.dataset.SHARD_SCHEMA`'s columns), or ``None`` if skipped."""

    image_id: int
    row: dict[str, Any] | None
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "kind", "message"}
    counts: dict[str, int] = field(
        default_factory=dict
    )  # images_converted, boxes, crowd_boxes, boxes_clipped, ...


def prepare_chunk(tasks: list[ImageTask], spec: ImageSpec) -> list[ImageResult]:
    """`prepare_image` over a list (the unit of work sent to a worker)."""
    return [prepare_image(task, spec) for task in tasks]


def prepare_image(task: ImageTask, spec: ImageSpec) -> ImageResult:
    """Verify one image (header checks, one full decode), make it an RGB JPEG if it is not, clip its boxes."""
    result = ImageResult(task.image_id, None)
    try:
        image = _open_header(task.data)
    except Image.DecompressionBombError as err:
        return _skipped(result, task.file, "too_large", f"{err} Skipped.", "images_too_large")
    except DECODE_ERRORS as err:
        return _skipped(result, task.file, "corrupt_image", f"cannot decode, skipped ({err})")
    width, height = image.size
    refused = _header_problem(task, spec, width, height)
    if refused is not None:
        return _skipped(result, task.file, *refused)
    mode, source_format = image.mode, image.format
    try:
        image.load()  # the one full decode: raises on truncated or corrupt data
    except DECODE_ERRORS as err:
        return _skipped(result, task.file, "corrupt_image", f"cannot decode, skipped ({err})")
    if mode == "RGB" and source_format == "JPEG":
        data = task.data  # the original bytes: no second JPEG loss
    else:
        data = _encode_jpeg(to_rgb(image), spec.jpeg_quality)
        result.counts["images_converted"] = 1
        scaled = " (16-bit scaled to 8-bit)" if mode in SIXTEEN_BIT_MODES else ""
        result.problems.append(
            problem(task.file, "converted", f"{source_format} mode {mode} converted to an RGB JPEG{scaled}")
        )
    boxes, labels, crowd = _clipped_boxes(task, width, height, result)
    result.counts.update(boxes=len(labels), crowd_boxes=len(crowd) // 4, images_written=1)
    result.row = {
        "image_id": task.image_id,
        "file": PurePath(task.file).name,
        "image": data,
        "width": width,
        "height": height,
        "boxes": boxes,
        "labels": labels,
        "crowd_boxes": crowd,
    }
    return result


def _clipped_boxes(
    task: ImageTask, width: int, height: int, result: ImageResult
) -> tuple[list[float], list[int], list[float]]:
    """Flat xyxy boxes, their labels and flat xyxy crowd boxes, clipped to the image (degenerate ones dropped)."""
    boxes: list[float] = []
    labels: list[int] = []
    crowd: list[float] = []
    for obj in task.objects:
        x1, y1 = max(obj.x, 0.0), max(obj.y, 0.0)
        x2, y2 = min(obj.x + obj.w, float(width)), min(obj.y + obj.h, float(height))
        if (x1, y1, x2, y2) != (obj.x, obj.y, obj.x + obj.w, obj.y + obj.h):
            _count(result.counts, "boxes_clipped")
        if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
            _count(result.counts, "boxes_dropped")
            result.problems.append(
                problem(task.file, "degenerate_box", f"box {[obj.x, obj.y, obj.w, obj.h]} (xywh) dropped")
            )
            continue
        if obj.iscrowd:
            crowd.extend((x1, y1, x2, y2))
        else:
            boxes.extend((x1, y1, x2, y2))
            labels.append(obj.label)
    return boxes, labels, crowd


def _open_header(data: bytes) -> Image.Image:
    """The image with only its header read (size, mode, format), nothing decoded yet.

    PIL's decompression-bomb *warning* (over ~89 Mpx) is silenced, as ``max_pixels`` is the cap
    here; its *error* (over ~179 Mpx) is raised as `Image.DecompressionBombError`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _header_problem(task: ImageTask, spec: ImageSpec, width: int, height: int) -> tuple[str, str, str] | None:
    """``(kind, message, count key)`` if the header's size rules the image out, else None."""
    if width * height > spec.max_pixels:
        return (
            "too_large",
            f"{width}x{height} = {width * height} pixels, over preprocess.max_pixels ({spec.max_pixels}), skipped",
            "images_too_large",
        )
    if task.declared_size is not None and task.declared_size != (width, height):
        declared_w, declared_h = task.declared_size
        return (
            "size_mismatch",
            f"annotation says {declared_w}x{declared_h}, file header says {width}x{height}, skipped "
            "(a wrong or forged header decodes as a flat grey picture, and the boxes would not fit)",
            "size_mismatches",
        )
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grey is scaled by 1/257 (PIL's own conversion clips it to white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) / SIXTEEN_TO_EIGHT_BITS
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _skipped(
    result: ImageResult, file: str, kind: str, message: str, count_key: str | None = None
) -> ImageResult:
    """``result`` with the image skipped: one problem, ``images_skipped`` and ``count_key`` counted."""
    result.problems.append(problem(file, kind, message))
    result.counts["images_skipped"] = 1
    if count_key is not None:
        result.counts[count_key] = 1
    return result


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def problem(file: str, kind: str, message: str) -> dict[str, str]:
    """A report entry: ``{"file", "kind", "message"}``, the message starting with the file."""
    return {"file": file, "kind": kind, "message": f"{file}: {message}"}
