"""The COCO on-disk layout every source is turned into, and checked reading of its JSON.

Layout (what stage fetch writes and stage preprocess reads)::

    <root>/annotations/instances_<split>.json
    <root>/<split>/<file_name>.jpg

An annotation file is a JSON object with lists ``images`` (``id``, ``file_name``, ``width``,
``height``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` = ``[x, y, w, h]``
in pixels, ``area``, ``iscrowd``) and ``categories`` (``id``, ``name``); ``info`` and
``licenses`` are optional (real files exist without them). Structural problems raise
`CocoFormatError` naming the file and the entry (``annotations[12].image_id``): not JSON, a
missing list, an image without ``id``/``file_name``, a duplicate id, an id that is not an
integer (``true`` is refused: Python's bool is an int, and ``image_id: true`` would land on
image 1), a number in ``bbox``/``area`` that is not finite (``NaN``, ``Infinity``: not JSON,
but Python reads and writes them). The ids are ``id`` of images and categories, and
``image_id``, ``category_id`` and (optional: tools fill it in) ``id`` of annotations. Other
problems of single annotations (not an object, a ``bbox`` of the wrong shape or with a
non-number, an id naming no image or category) are left to the reader to skip and report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_LISTS = ("images", "annotations", "categories")
KIND_NAMES = {int: "an integer", str: "a string"}


class CocoFormatError(ValueError):
    """An annotation file or dataset directory that is not COCO; the message names the file."""


def annotation_path(root: str | Path, split: str) -> Path:
    """``<root>/annotations/instances_<split>.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    """``<root>/<split>``: where the split's ``file_name``s live."""
    return Path(root) / split


def read_coco(path: str | Path) -> dict[str, Any]:
    """Load and structurally check one COCO annotation file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CocoFormatError(f"{path}: annotation file not found") from None
    except OSError as err:
        raise CocoFormatError(f"{path}: cannot read: {err}") from err
    try:
        coco = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{path}: expected a JSON object at the top level, got {type(coco).__name__}")
    for key in REQUIRED_LISTS:
        if not isinstance(coco.get(key), list):
            raise CocoFormatError(f"{path}: '{key}' must be a list (found {type(coco.get(key)).__name__})")
    _check_entries(path, coco["images"], "images", {"id": int, "file_name": str})
    _check_entries(path, coco["categories"], "categories", {"id": int, "name": str})
    for i, ann in enumerate(coco["annotations"]):
        if isinstance(ann, dict):  # a non-object is the reader's to skip
            _check_annotation(path, i, ann)
    for i, image in enumerate(coco["images"]):
        if not is_plain_relative(image["file_name"]):
            raise CocoFormatError(
                f"{path}: images[{i}].file_name {image['file_name']!r} must be a relative path without '..'"
            )
    return coco


def is_plain_relative(name: str) -> bool:
    """True for a relative path that stays below its folder (no root, drive, ``..`` or empty part)."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    parts = name.replace("\\", "/").split("/")
    return all(part not in ("", ".", "..") for part in parts)


def _check_field(path: Path, where: str, value: Any, kind: type) -> None:
    """Raise `CocoFormatError` unless ``value`` is a ``kind`` (a bool is never an int here)."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CocoFormatError(f"{path}: {where} must be {KIND_NAMES[kind]}, got {value!r}")


def _check_finite(path: Path, where: str, value: Any) -> None:
    """Raise `CocoFormatError` if ``value`` is a float that is NaN or infinite (other types pass)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CocoFormatError(f"{path}: {where} must be a finite number, got {value!r}")


def _check_annotation(path: Path, i: int, ann: dict[str, Any]) -> None:
    """Integer ids and finite ``bbox``/``area`` numbers of ``annotations[i]`` (see the module docstring)."""
    where = f"annotations[{i}]"
    for name in ("image_id", "category_id"):
        _check_field(path, f"{where}.{name}", ann.get(name), int)
    if "id" in ann:
        _check_field(path, f"{where}.id", ann["id"], int)
    if isinstance(ann.get("bbox"), list):
        for k, value in enumerate(ann["bbox"]):
            _check_finite(path, f"{where}.bbox[{k}]", value)
    _check_finite(path, f"{where}.area", ann.get("area"))


def _check_entries(path: Path, entries: list[Any], key: str, fields: dict[str, type]) -> None:
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CocoFormatError(f"{path}: {key}[{i}] is not an object")
        for name, kind in fields.items():
            _check_field(path, f"{key}[{i}].{name}", entry.get(name), kind)
        if entry["id"] in seen:
            raise CocoFormatError(f"{path}: {key}[{i}]: duplicate id {entry['id']}")
        seen.add(entry["id"])


def first_images(coco: dict[str, Any], count: int) -> dict[str, Any]:
    """The same dataset restricted to its first ``count`` images (file order) and their annotations."""
    images = coco["images"][:count]
    keep = {image["id"] for image in images}
    subset = dict(coco)
    subset["images"] = images
    subset["annotations"] = [
        a for a in coco["annotations"] if isinstance(a, dict) and a.get("image_id") in keep
    ]
    return subset


def write_json(path: str | Path, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as UTF-8 JSON (compact unless ``indent``), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = None if indent else (",", ":")
    path.write_text(json.dumps(obj, indent=indent, separators=separators, ensure_ascii=False) + "\n")


def missing_images(root: str | Path, split: str, coco: dict[str, Any]) -> list[str]:
    """``file_name``s of ``coco``'s images that are not files under ``<root>/<split>``."""
    folder = image_dir(root, split)
    return [image["file_name"] for image in coco["images"] if not (folder / image["file_name"]).is_file()]
