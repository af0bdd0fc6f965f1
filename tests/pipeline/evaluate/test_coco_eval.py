"""pipeline.evaluate.coco_eval: COCO numbers through pycocotools, against published numbers and exact cases."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate.coco_eval import (
    PROPOSAL_KEYS,
    STANDARD_KEYS,
    EvaluationError,
    coco_metrics,
    evaluate_detections,
    ground_truth_from_dict,
    load_ground_truth,
    proposal_recall,
)
from pipeline.inference import ImageDetections, coco_results, to_original_frame
from tests.detection_samples import coco_mini_preprocessed, read_categories

# cocoapi's published bbox numbers for instances_val2014_fakebbox100_results.json (results/ in
# github.com/cocodataset/cocoapi; ../shared/data/README.md), full precision where published.
PUBLISHED_FAKEBBOX = {
    "AP": 0.5045806987249628,
    "AP50": 0.697,
    "AP75": 0.573,
    "APs": 0.586,
    "APm": 0.519,
    "APl": 0.501,
    "AR1": 0.387,
    "AR10": 0.594,
    "AR100": 0.595,
    "ARs": 0.640,
    "ARm": 0.566,
    "ARl": 0.564,
}


@pytest.fixture
def cocoapi_eval(shared_data: Path) -> Path:
    return shared_data / "cocoapi-eval"


def gt_as_results(annotation_file: Path) -> list[dict]:
    """Every non-crowd ground-truth box as a detection with score 1."""
    anns = json.loads(annotation_file.read_text())["annotations"]
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in anns
        if not a.get("iscrowd", 0)
    ]


def tiny_gt(with_defaults: bool = False) -> dict:
    """Two images, two categories (COCO ids 3 and 7), boxes of every size; no iscrowd/area keys."""
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20]},  # small (400 px^2)
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [40, 40, 50, 40]},  # medium
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 120, 100]},  # large
    ]
    if with_defaults:
        for ann in anns:
            ann.update(iscrowd=0, area=ann["bbox"][2] * ann["bbox"][3])
    return {
        "images": [{"id": 10, "width": 128, "height": 128}, {"id": 11, "width": 128, "height": 128}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
    }


def test_fakebbox_results_give_cocoapis_published_numbers(cocoapi_eval: Path) -> None:
    metrics = coco_metrics(
        cocoapi_eval / "instances_val2014_100.json",
        cocoapi_eval / "instances_val2014_fakebbox100_results.json",
    )
    assert list(metrics) == list(STANDARD_KEYS)
    assert metrics["AP"] == pytest.approx(PUBLISHED_FAKEBBOX["AP"], abs=1e-12)
    for key, value in PUBLISHED_FAKEBBOX.items():
        assert metrics[key] == pytest.approx(value, abs=5e-4), key


def test_ground_truth_as_detections_gives_ap_one(cocoapi_eval: Path) -> None:
    annotation_file = cocoapi_eval / "instances_val2014_100.json"
    metrics = coco_metrics(annotation_file, gt_as_results(annotation_file))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-6), key


def test_no_detections_give_zero_without_crash(cocoapi_eval: Path) -> None:
    metrics = coco_metrics(cocoapi_eval / "instances_val2014_100.json", [])
    assert metrics == {key: 0.0 for key in STANDARD_KEYS}
    gt = ground_truth_from_dict(tiny_gt())
    evaluation = evaluate_detections(gt, [])
    assert evaluation.per_category_ap == {3: 0.0, 7: 0.0}
    assert np.all(evaluation.pr_precision_50 == 0)


def test_unknown_image_ids_raise_naming_them(tmp_path: Path) -> None:
    (tmp_path / "gt.json").write_text(json.dumps(tiny_gt()))
    results = [
        {"image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9},
        {"image_id": 999, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9},
        {"image_id": 12345, "category_id": 7, "bbox": [5, 5, 20, 20], "score": 0.9},
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(
        EvaluationError, match=r"results\.json: 2 image id\(s\) not in the ground truth: 999, 12345"
    ):
        coco_metrics(tmp_path / "gt.json", tmp_path / "results.json")


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="missing.json: annotation file not found"):
        load_ground_truth(tmp_path / "missing.json")
    (tmp_path / "gt.json").write_text(json.dumps({"images": []}))
    with pytest.raises(
        EvaluationError,
        match=r"gt.json: not a COCO instances file: missing key\(s\) \['annotations', 'categories'\]",
    ):
        load_ground_truth(tmp_path / "gt.json")
    (tmp_path / "gt.json").write_text(json.dumps(tiny_gt()))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 10, "bbox": [1, 2, 3, 4]}]))
    with pytest.raises(
        EvaluationError, match=r"res.json\[0\]: expected image_id, category_id, bbox and score"
    ):
        coco_metrics(tmp_path / "gt.json", tmp_path / "res.json")
    with pytest.raises(EvaluationError, match=r"category id\(s\) not in the ground truth: \[4\]"):
        coco_metrics(
            tmp_path / "gt.json", [{"image_id": 10, "category_id": 4, "bbox": [1, 2, 3, 4], "score": 1}]
        )


def test_ground_truth_without_iscrowd_and_area_matches_explicit_defaults() -> None:
    results = [
        {"image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9},
        {"image_id": 10, "category_id": 7, "bbox": [42, 40, 50, 40], "score": 0.8},  # IoU 0.92
        {"image_id": 11, "category_id": 7, "bbox": [0, 0, 120, 100], "score": 0.7},  # wrong class
    ]
    bare = evaluate_detections(ground_truth_from_dict(tiny_gt()), results)
    full = evaluate_detections(ground_truth_from_dict(tiny_gt(with_defaults=True)), results)
    assert bare.metrics == full.metrics
    # Category 3: one of two boxes found at every IoU (AP 0.5 by COCO's 101-point interpolation),
    # category 7: IoU 0.923, a match at thresholds .50 ... .90 (9 of 10); the wrong-class box ranks lower.
    assert bare.per_category_ap[3] == pytest.approx(0.50495, abs=1e-4)
    assert bare.per_category_ap[7] == pytest.approx(0.9, abs=1e-6)
    assert bare.metrics["APs"] == pytest.approx(1.0) and bare.metrics["APl"] == pytest.approx(0.0)
    assert bare.pr_recall.shape == bare.pr_precision_50.shape == bare.pr_precision_50_95.shape == (101,)
    # At IoU .5, recall 1.0: category 3 never gets there (precision 0), category 7 does (1): mean 0.5.
    assert bare.pr_precision_50[0] == pytest.approx(1.0) and bare.pr_precision_50[-1] == pytest.approx(0.5)


def test_image_ids_restrict_the_evaluation() -> None:
    gt = ground_truth_from_dict(tiny_gt())
    results = [{"image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}]
    assert evaluate_detections(gt, results).per_category_ap[3] == pytest.approx(0.50495, abs=1e-4)
    assert evaluate_detections(gt, results, image_ids=[10]).per_category_ap[3] == pytest.approx(1.0)


def test_proposal_recall_is_class_agnostic_and_per_size() -> None:
    gt = ground_truth_from_dict(tiny_gt())
    exact = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0} for a in gt.dataset["annotations"]]
    assert proposal_recall(gt, exact) == {key: pytest.approx(1.0) for key in PROPOSAL_KEYS}
    assert proposal_recall(gt, []) == {key: 0.0 for key in PROPOSAL_KEYS}
    # Only the small box found, ranked after 150 misses: counts at 1000 proposals, not at 100.
    misses = [{"image_id": 10, "bbox": [100, 100, 5, 5], "score": 0.9}] * 150
    late = misses + [{"image_id": 10, "bbox": [5, 5, 20, 20], "score": 0.1}]
    recall = proposal_recall(gt, late)
    assert recall["AR100"] == 0.0
    assert recall["AR1k"] == pytest.approx(1 / 3)
    assert (recall["ARs1k"], recall["ARm1k"], recall["ARl1k"]) == (pytest.approx(1.0), 0.0, 0.0)


def test_gt_as_detections_through_label_and_scale_mapping(shared_data: Path, tmp_path: Path) -> None:
    """coco-mini (real COCO ids 1..90 with gaps): resized-frame boxes with contiguous labels, mapped
    back by scale_x/scale_y and categories.json, score AP 1 against the original annotation file."""
    root = coco_mini_preprocessed(shared_data, tmp_path, images=6)
    index = json.loads((root / "val2017" / "index.json").read_text())
    categories = read_categories(root)
    assert any(c["label"] != c["id"] for c in categories)  # the mapping matters
    detections = []
    for entry in index["images"]:
        n = len(entry["labels"])
        resized = ImageDetections(
            image_id=-1,
            boxes=np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4),
            scores=np.ones(n, dtype=np.float32),
            labels=np.asarray(entry["labels"], dtype=np.int64),
            proposals=np.asarray(entry["boxes"], dtype=np.float32).reshape(-1, 4),
            proposal_scores=np.ones(n, dtype=np.float32),
        )
        detections.append(to_original_frame(resized, entry["image_id"], entry["scale_x"], entry["scale_y"]))
    image_ids = [entry["image_id"] for entry in index["images"]]
    gt = load_ground_truth(index["annotation_file"])
    evaluation = evaluate_detections(gt, coco_results(detections, categories), image_ids=image_ids)
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert evaluation.metrics[key] == pytest.approx(1.0, abs=1e-6), key
    assert all(math.isclose(ap, 1.0, abs_tol=1e-6) for ap in evaluation.per_category_ap.values())
    # Over all 80 coco-mini images (74 without detections) the same detections score far lower.
    assert evaluate_detections(gt, coco_results(detections, categories)).metrics["AR100"] < 0.5


def test_evaluations_in_parallel_threads_leave_stdout_as_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    # stages.ablate evaluates variants in threads: pycocotools' prints are silenced by swapping
    # sys.stdout, which must never leave another thread's buffer in place (the final report vanished).
    gt = ground_truth_from_dict(tiny_gt())
    results = [{"image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}]
    stdout = sys.stdout

    def evaluate_many(_: int) -> float:
        return sum(evaluate_detections(gt, results).metrics["AP"] for _ in range(40))

    with ThreadPoolExecutor(max_workers=4) as pool:
        totals = list(pool.map(evaluate_many, range(8)))
    assert sys.stdout is stdout
    assert len(set(totals)) == 1
    print("still printed")
    assert capsys.readouterr().out == "still printed\n"


GOOD_RESULT = {"image_id": 10, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"score": math.nan}, r"score: must be a finite number, got nan"),
        ({"score": -math.inf}, r"score: must be a finite number, got -inf"),
        ({"score": "high"}, r"score: must be a finite number, got 'high'"),
        ({"score": True}, r"score: must be a finite number, got True"),
        ({"bbox": ["a", 5, 20, 20]}, r"bbox: must be 4 finite numbers \[x, y, w, h\], got \['a', 5, 20, 20\]"),
        ({"bbox": "abcd"}, r"bbox: must be 4 finite numbers \[x, y, w, h\], got 'abcd'"),
        ({"bbox": [5, 5, math.inf, 20]}, r"bbox: must be 4 finite numbers \[x, y, w, h\], got \[5, 5, inf, 20\]"),
        ({"image_id": True}, r"image_id: must be an integer, got True"),
        ({"category_id": "3"}, r"category_id: must be an integer, got '3'"),
    ],
)
def test_bad_result_values_are_refused_naming_the_file_index_and_key(
    tmp_path: Path, change: dict, message: str
) -> None:
    """NaN/inf scores were accepted; a bbox of strings gave a ValueError traceback."""
    (tmp_path / "gt.json").write_text(json.dumps(tiny_gt()))
    (tmp_path / "res.json").write_text(json.dumps([GOOD_RESULT, {**GOOD_RESULT, **change}]))
    with pytest.raises(EvaluationError, match=rf"res\.json\[1\]\.{message}$"):
        coco_metrics(tmp_path / "gt.json", tmp_path / "res.json")


def test_bad_ground_truth_boxes_and_ids_are_refused_naming_the_entry() -> None:
    gt = tiny_gt()
    gt["annotations"][2]["bbox"] = [0, 0, "wide", 100]
    with pytest.raises(EvaluationError, match=r"ground truth: annotations\[2\]\.bbox: must be 4 finite numbers"):
        ground_truth_from_dict(gt)
    gt = tiny_gt()
    gt["annotations"][1]["image_id"] = True
    with pytest.raises(EvaluationError, match=r"ground truth: annotations\[1\]\.image_id: must be an integer"):
        ground_truth_from_dict(gt)
