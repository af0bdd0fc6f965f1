"""The COCO on-disk layout every source is turned into, and checked reading of its JSON.

Layout (what stage fetch writes and stage preprocess reads)::

    <root>/annotations/instances_<split>.json
    <root>/<split>/<file_name>.jpg

An annotation file is a JSON object with lists ``images`` (``id``, ``file_name``, ``width``,
``height``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` = ``[x, y, w, h]``
in pixels, ``area``, ``iscrowd``) and ``categories`` (``id``, ``name``); ``info`` and
``licenses`` are optional (real files exist without them). Structural problems (not JSON, a
missing list, an image without ``id``/``file_name``, a duplicate id) raise `CocoFormatError`
naming the file; problems of single annotations are left to the reader to skip and report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REQUIRED_LISTS = ("images", "annotations", "categories")


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


def _check_entries(path: Path, entries: list[Any], key: str, fields: dict[str, type]) -> None:
    seen: set[int] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CocoFormatError(f"{path}: {key}[{i}] is not an object")
        for name, kind in fields.items():
            value = entry.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CocoFormatError(f"{path}: {key}[{i}].{name} must be {kind.__name__}, got {value!r}")
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
