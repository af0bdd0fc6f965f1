"""pipeline.fetch.synthetic_context: small objects whose class only a distant outline tells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.config import DataConfig
from pipeline.fetch.synthetic import Shape, generate_synthetic
from pipeline.fetch.synthetic_context import CATEGORIES, MARK_OF, OUTLINE_MARGIN, draw_image, inset

CFG = DataConfig(synthetic_kind="context", synthetic_train_images=40, synthetic_val_images=4, seed=1)


def drawn(count: int) -> list[list[Shape]]:
    return [draw_image(np.random.default_rng([0, 0, i]), 320, 256)[1] for i in range(count)]


def region_of(mark: Shape, regions: list[Shape]) -> Shape:
    """The region whose polygon holds the mark's centre (exactly one must)."""
    centre = mark.polygon.mean(0)
    holding = [r for r in regions if inset((*centre, *centre), r.polygon) > 0]
    assert len(holding) == 1, f"mark at {centre} lies in {len(holding)} regions"
    return holding[0]


def test_every_mark_lies_deep_inside_the_region_that_sets_its_class() -> None:
    marks = 0
    for shapes in drawn(60):
        regions = [s for s in shapes if s.name in MARK_OF]
        for mark in (s for s in shapes if s.name not in MARK_OF):
            region = region_of(mark, regions)
            assert mark.name == MARK_OF[region.name]
            assert inset(mark.box, region.polygon) >= OUTLINE_MARGIN
            marks += 1
    assert marks > 60


def test_the_two_small_classes_look_alike_on_their_own() -> None:
    """Same size distribution for boats and sheep (their colours come from one draw too)."""
    sides: dict[str, list[float]] = {"boat": [], "sheep": []}
    for shapes in drawn(150):
        for s in shapes:
            if s.name in sides:
                x1, y1, x2, y2 = s.box
                sides[s.name].append(max(x2 - x1, y2 - y1))
    assert min(len(v) for v in sides.values()) > 80
    assert abs(np.mean(sides["boat"]) - np.mean(sides["sheep"])) < 1.0
    assert min(min(v) for v in sides.values()) >= 8.0 and max(max(v) for v in sides.values()) <= 16.0


def test_inset_of_a_box_in_a_square() -> None:
    square = np.array([[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0]])
    assert inset((40, 40, 60, 60), square) == pytest.approx(40.0)
    assert inset((-5, 10, 20, 20), square) == pytest.approx(-5.0)


def test_written_as_coco_with_the_context_categories(tmp_path: Path) -> None:
    generate_synthetic(CFG, tmp_path, progress=False)
    path = tmp_path / "annotations" / "instances_train2017.json"
    coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == [c["id"] for c in CATEGORIES] == [3, 6, 11, 13]
    assert len(coco.getImgIds()) == 40
    names = {c["id"]: c["name"] for c in CATEGORIES}
    small = [a for a in coco.loadAnns(coco.getAnnIds()) if a["area"] < 32**2]
    assert small and {names[a["category_id"]] for a in small} == {"boat", "sheep"}
    assert "context" in json.loads(path.read_text())["info"]["description"]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="synthetic_kind"):
        DataConfig(synthetic_kind="faces")
