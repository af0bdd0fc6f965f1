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
* Grayscale, CMYK, palette, ... images are converted to RGB and counted as converted; 16-bit
  grey (PIL modes ``I;16*``, and ``I`` as some decoders give it) is scaled by 1/257 (65535 ->
  255), not clipped (which made it white).
* An RGB JPEG already at the target size is passed through byte for byte (no re-encoding).
* Checked from the header, before anything is decoded (PIL's ``Image.open`` reads only the
  header): an image over ``ResizeSpec.max_pixels`` (``preprocess.max_pixels``), or over PIL's
  own decompression-bomb limit, is skipped (``too_large``); so is one whose size differs from
  the annotation file's ``width``/``height`` (``size_mismatch``): a forged or wrong header
  decodes as a flat grey picture, and the boxes would not fit it. Without ``width``/``height``
  in the annotation file that second check cannot be made.
* Skipped images are counted in ``images_skipped`` and in their own count
  (``images_too_large``, ``size_mismatches``), and reported as problems; none raises.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import PreprocessConfig

MIN_BOX_SIDE = 1.0  # original pixels
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # PIL modes of 16-bit grey
SIXTEEN_TO_EIGHT_BITS = 257  # 65535 / 255
DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises for truncated or corrupt data


@dataclass(frozen=True)
class ResizeSpec:
    """The target scale (the model's ``min_size``/``max_size``), JPEG quality, and the size cap."""

    min_size: int
    max_size: int
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
        image = _open_header(task.data)
    except Image.DecompressionBombError as err:
        return _skipped(result, task.file, "too_large", f"{err} Skipped.", "images_too_large")
    except DECODE_ERRORS as err:
        return _skipped(result, task.file, "corrupt_image", f"cannot decode, skipped ({err})")
    width, height = image.size
    refused = _header_problem(task, spec, width, height)
    if refused is not None:
        return _skipped(result, task.file, *refused)
    new_w, new_h = resized_size(width, height, spec.min_size, spec.max_size)
    mode, source_format = image.mode, image.format
    try:
        image = _decode_rgb(image, new_w, new_h)
    except DECODE_ERRORS as err:
        return _skipped(result, task.file, "corrupt_image", f"cannot decode, skipped ({err})")
    if mode != "RGB":
        counts["images_converted"] = 1
        scaled = " (16-bit scaled to 8-bit)" if mode in SIXTEEN_BIT_MODES else ""
        result.problems.append(problem(task.file, "converted", f"mode {mode} converted to RGB{scaled}"))
    if (width, height) == (new_w, new_h) and mode == "RGB" and source_format == "JPEG":
        jpeg = task.data  # already at scale: keep the original bytes (no second JPEG loss)
    else:
        jpeg = _encode_jpeg(image, (new_w, new_h), spec.jpeg_quality)
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


def _open_header(data: bytes) -> Image.Image:
    """The image with only its header read (size, mode, format), nothing decoded yet.

    PIL's decompression-bomb *warning* (over ~89 Mpx) is silenced, as ``max_pixels`` is the cap
    here; its *error* (over ~179 Mpx) is raised as `Image.DecompressionBombError`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _header_problem(
    task: ImageTask, spec: ResizeSpec, width: int, height: int
) -> tuple[str, str, str] | None:
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


def _decode_rgb(image: Image.Image, new_w: int, new_h: int) -> Image.Image:
    """Decode ``image`` (a JPEG at a reduced scale when it is at least twice the target) as RGB."""
    width, height = image.size
    if image.format == "JPEG" and (new_w * 2 <= width and new_h * 2 <= height):
        image.draft("RGB", (new_w, new_h))  # decode at 1/2, 1/4 or 1/8 scale: much faster
    image.load()  # raises on truncated or corrupt data
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit grey is scaled by 1/257 (PIL's own conversion clips it to white)."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32) / SIXTEEN_TO_EIGHT_BITS
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _encode_jpeg(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    """``image`` resized (bilinear) to ``size`` and encoded as JPEG."""
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
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


def _r(value: float) -> float:
    return round(value, 2)


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def problem(file: str, kind: str, message: str) -> dict[str, str]:
    """A report entry: ``{"file", "kind", "message"}``, the message starting with the file."""
    return {"file": file, "kind": kind, "message": f"{file}: {message}"}
