"""pipeline.inference: frame and label mapping, the preprocessed-split reader, Ray shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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
    to_original_frame,
)
from tests.detection_compare import assert_same_detections
from tests.detection_samples import read_categories, synthetic_preprocessed, tiny_model_file

CATEGORIES = [{"label": 1, "id": 18, "name": "dog"}, {"label": 2, "id": 90, "name": "toothbrush"}]


def detections(boxes: list[list[float]], labels: list[int]) -> ImageDetections:
    n = len(boxes)
    return ImageDetections(
        image_id=-1,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        scores=np.linspace(0.9, 0.5, n, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        proposals=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        proposal_scores=np.ones(n, dtype=np.float32),
    )


def test_original_frame_and_coco_ids() -> None:
    resized = detections([[10, 20, 30, 60]], [2])
    original = to_original_frame(resized, 7, scale_x=0.5, scale_y=2.0)
    assert original.image_id == 7
    np.testing.assert_allclose(original.boxes, [[20, 10, 60, 30]])
    assert coco_results([original], CATEGORIES) == [
        {"image_id": 7, "category_id": 90, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.9}
    ]
    assert proposal_results([original]) == [{"image_id": 7, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 1.0}]
    assert coco_results([to_original_frame(detections([], []), 8, 1.0, 1.0)], CATEGORIES) == []


def test_proposal_arrays_are_proposal_results_image_by_image() -> None:
    boxes = [[10.004, 20.0, 30.5, 60.25], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]
    first = to_original_frame(detections(boxes, [1, 1, 2]), 7, scale_x=0.3, scale_y=1.7)
    first.proposal_scores = np.array([0.25, 0.75, 0.25], dtype=np.float32)
    empty = to_original_frame(detections([], []), 8, 1.0, 1.0)
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
    assert tensor.shape == (3, 5, 7) and float(tensor.max()) == pytest.approx(128 / 255)
    assert image_to_tensor(Image.new("RGBA", (4, 4))).shape == (3, 4, 4)


def test_read_index_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path}/val2017/index.json: not found"):
        read_index(tmp_path, "val2017")
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "index.json").write_text(
        json.dumps({"annotation_file": "x", "images": [{"image_id": 1}]})
    )
    with pytest.raises(DatasetError, match=r"images\[0\] lacks 'file'"):
        read_index(tmp_path, "val2017")


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
