"""Stage fetch's local source asked for one split only (what benchmarks/coco_fidelity.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.coco_format import annotation_path, read_coco
from pipeline.config import ConfigError, DataConfig
from pipeline.fetch.stage import fetch_dataset


def test_local_fetch_of_the_validation_split_alone(shared_data: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source="local", max_images=2)
    summaries = fetch_dataset(
        cfg, tmp_path / "coco", local_dir=shared_data / "coco-mini", splits=("val2017",), progress=False
    )
    assert [(s.split, s.images, s.missing_files) for s in summaries] == [("val2017", 2, ())]
    assert len(list((tmp_path / "coco" / "val2017").glob("*.jpg"))) == 2
    assert not (tmp_path / "coco" / "train2017").exists()
    assert not annotation_path(tmp_path / "coco", "train2017").exists()
    assert len(read_coco(annotation_path(tmp_path / "coco", "val2017"))["images"]) == 2


@pytest.mark.parametrize(
    ("source", "splits"), [("synthetic", ("val2017",)), ("local", ("test2017",)), ("local", ())]
)
def test_splits_other_than_the_configured_ones_or_another_source_are_refused(
    tmp_path: Path, source: str, splits: tuple[str, ...]
) -> None:
    local_dir = tmp_path if source == "local" else None
    with pytest.raises(ConfigError, match="splits"):
        fetch_dataset(DataConfig(source=source), tmp_path / "out", local_dir=local_dir, splits=splits)
    assert not (tmp_path / "out").exists()
