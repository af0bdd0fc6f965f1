"""pipeline.inference: label mapping, the preprocessed-split reader, detections in original pixels, Ray parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.dataset import DatasetError, read_index
from pipeline.inference import (
    ImageDetections,
    InferenceError,
    coco_results,
    image_to_tensor,
    predict_split,
    proposal_arrays,
    proposal_results,
)
from tests.detection_compare import assert_same_detections
from tests.detection_samples import read_categories, synthetic_preprocessed, tiny_model_file

CATEGORIES = [{"label": 1, "id": 18, "name": "dog"}, {"label": 2, "id": 90, "name": "toothbrush"}]


def detections(boxes: list[list[float]], labels: list[int], image_id: int = -1) -> ImageDetections:
    n = len(boxes)
    return ImageDetections(
        image_id=image_id,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.linspace(0.9, 0.5, n, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        proposals=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        proposal_scores=np.ones(n, dtype=np.float32),
    )


def test_coco_ids_and_xywh() -> None:
    original = detections([[20, 10, 60, 30]], [2], image_id=7)
    assert coco_results([original], CATEGORIES) == [
        {"image_id": 7, "category_id": 90, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.9}
    ]
    assert proposal_results([original]) == [{"image_id": 7, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 1.0}]
    assert coco_results([detections([], [], image_id=8)], CATEGORIES) == []


def test_proposal_arrays_are_proposal_results_image_by_image() -> None:
    boxes = [[10.004, 20.0, 30.5, 60.25], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]
    first = detections(
        [[b[0] / 0.3, b[1] / 1.7, b[2] / 0.3, b[3] / 1.7] for b in boxes], [1, 1, 2], image_id=7
    )
    first.proposal_scores = np.array([0.25, 0.75, 0.25], dtype=np.float32)
    empty = detections([], [], image_id=8)
    stream = proposal_arrays([first, empty])
    assert not isinstance(stream, list)  # a generator: one image at a time
    arrays = list(stream)
    assert [image_id for image_id, _, _ in arrays] == [7, 8]
    for _, xywh, scores in arrays:
        assert xywh.dtype == scores.dtype == np.float64 and xywh.shape == (len(scores), 4)
    as_dicts = [
        {"image_id": image_id, "bbox": box, "score": score}
        for image_id, xywh, scores in arrays
        for box, score in zip(xywh.tolist(), scores.tolist(), strict=True)
    ]
    assert as_dicts == proposal_results([first, empty])  # the same numbers, exactly


def test_unknown_label_is_an_error() -> None:
    with pytest.raises(InferenceError, match=r"label\(s\) \[3\]"):
        coco_results([detections([[0, 0, 1, 1]], [3])], CATEGORIES)


def test_any_image_mode_becomes_three_channels() -> None:
    grey = Image.new("L", (7, 5), color=128)
    tensor = image_to_tensor(grey)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 5, 7) and int(tensor.max()) == 128
    assert image_to_tensor(Image.new("RGBA", (4, 4))).shape == (3, 4, 4)


def test_read_index_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path}/val2017/split.json: not found"):
        read_index(tmp_path, "val2017")
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "split.json").write_text(json.dumps({"annotation_file": "x"}))
    with pytest.raises(
        DatasetError, match=r"split\.json: expected an object with 'annotation_file' and 'shards'"
    ):
        read_index(tmp_path, "val2017")
    (tmp_path / "val2017" / "split.json").write_text(json.dumps({"annotation_file": "x", "shards": []}))
    with pytest.raises(DatasetError, match=f"{tmp_path}/val2017/index.parquet: not found"):
        read_index(tmp_path, "val2017")


def test_detections_are_in_original_pixels_of_a_larger_image(tmp_path: Path) -> None:
    """Images stored at 400x320 (over the model's 128..160): the model resizes them itself and its
    boxes come back in the stored (original) pixels, the COCO frame, with no scaling by the caller."""
    root = synthetic_preprocessed(tmp_path, images=2, width=400, height=320)
    index = read_index(root, "val2017")
    assert index.widths.tolist() == [400, 400] and index.heights.tolist() == [320, 320]
    model = tiny_model_file(tmp_path / "model.pt", read_categories(root))
    run = predict_split(model, root, "val2017", batch_size=2)
    boxes = np.concatenate([d.boxes for d in run.detections])
    assert len(boxes) > 0 and boxes[:, 2].max() > 160 and boxes[:, 3].max() > 128  # beyond the model's size
    assert boxes[:, 2].max() <= 400 and boxes[:, 3].max() <= 320


@pytest.mark.slow
def test_ray_shards_give_the_same_detections_as_one_process(tmp_path: Path) -> None:
    root = synthetic_preprocessed(tmp_path, images=4)
    model = tiny_model_file(tmp_path / "model.pt", read_categories(root))
    local = predict_split(model, root, "val2017", batch_size=1)
    on_ray = predict_split(model, root, "val2017", batch_size=1, num_workers=2)
    assert on_ray.num_workers == 2 and len(on_ray.detections) == 4
    assert [d.image_id for d in on_ray.detections] == [d.image_id for d in local.detections]
    for a, b in zip(local.detections, on_ray.detections, strict=True):
        assert len(a.boxes) > 0
        # One process and two Ray workers run different thread counts: the same detections,
        # but near-equal scores may swap places. Compare as sets.
        assert_same_detections(a.boxes, a.scores, b.boxes, b.scores, a.labels, b.labels)
        assert_same_detections(a.proposals, a.proposal_scores, b.proposals, b.proposal_scores)
