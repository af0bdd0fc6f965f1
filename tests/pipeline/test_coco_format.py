"""pipeline.coco_format.read_coco: ids must be integers (never booleans), box numbers finite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.coco_format import CocoFormatError, read_coco


def coco(**changes: Any) -> dict[str, Any]:
    """A valid two-image file; ``changes`` replace fields: ``annotations__0__image_id=True``."""
    data: dict[str, Any] = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 3, "bbox": [1.5, 2, 3, 4], "area": 12, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    for dotted, value in changes.items():
        key, index, field = dotted.split("__")
        data[key][int(index)][field] = value
    return data


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))  # json.dumps writes NaN/Infinity, which json.loads reads back
    return path


def test_a_valid_file_reads(tmp_path: Path) -> None:
    assert read_coco(write(tmp_path, coco()))["annotations"][1]["bbox"] == [1.5, 2, 3, 4]


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"annotations__1__image_id": True}, r"annotations\[1\]\.image_id must be an integer, got True"),
        ({"annotations__0__image_id": 1.0}, r"annotations\[0\]\.image_id must be an integer, got 1\.0"),
        ({"annotations__1__category_id": "3"}, r"annotations\[1\]\.category_id must be an integer, got '3'"),
        ({"annotations__0__id": False}, r"annotations\[0\]\.id must be an integer, got False"),
        ({"images__1__id": True}, r"images\[1\]\.id must be an integer, got True"),
        ({"categories__0__id": True}, r"categories\[0\]\.id must be an integer, got True"),
    ],
)
def test_non_integer_ids_are_refused_naming_the_file_and_index(
    tmp_path: Path, change: dict[str, Any], where: str
) -> None:
    """``image_id: true`` used to be attached to image 1 (a bool is an int in Python)."""
    path = write(tmp_path, coco(**change))
    with pytest.raises(CocoFormatError, match=rf"{path}: {where}"):
        read_coco(path)


def test_an_annotation_without_image_or_category_id_is_refused(tmp_path: Path) -> None:
    data = coco()
    del data["annotations"][1]["category_id"]
    path = write(tmp_path, data)
    with pytest.raises(CocoFormatError, match=r"annotations\[1\]\.category_id must be an integer, got None"):
        read_coco(path)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"annotations__1__bbox": [1, 2, float("nan"), 4]}, r"annotations\[1\]\.bbox\[2\]"),
        ({"annotations__0__bbox": [float("inf"), 2, 3, 4]}, r"annotations\[0\]\.bbox\[0\]"),
        ({"annotations__1__area": float("-inf")}, r"annotations\[1\]\.area"),
        ({"annotations__0__area": float("nan")}, r"annotations\[0\]\.area"),
    ],
)
def test_non_finite_box_numbers_are_refused(tmp_path: Path, change: dict[str, Any], where: str) -> None:
    path = write(tmp_path, coco(**change))
    with pytest.raises(
        CocoFormatError, match=rf"{path}: {where} must be a finite number, got (nan|inf|-inf)"
    ):
        read_coco(path)


def test_a_malformed_bbox_is_left_to_the_reader_to_skip(tmp_path: Path) -> None:
    """Shapes and types of single boxes stay per-annotation problems (stage preprocess reports them)."""
    data = read_coco(write(tmp_path, coco(annotations__0__bbox=["a", 1, 5, 5], annotations__1__bbox=[1, 2])))
    assert data["annotations"][0]["bbox"] == ["a", 1, 5, 5]
