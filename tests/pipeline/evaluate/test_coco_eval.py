"""pipeline.evaluate.coco_eval: COCO numbers through pycocotools, against published numbers and exact cases."""

from __future__ import annotations

import json
import math
import sys
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.dataset import DetectionDataset
from pipeline.evaluate.coco_eval import (
    PROPOSAL_KEYS,
    STANDARD_KEYS,
    EvaluationError,
    ProposalRecall,
    coco_metrics,
    evaluate_detections,
    ground_truth_from_dict,
    load_ground_truth,
    proposal_recall,
    streaming_proposal_recall,
)
from pipeline.inference import ImageDetections, coco_results
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


def test_gt_as_detections_through_label_mapping(shared_data: Path, tmp_path: Path) -> None:
    """coco-mini (real COCO ids 1..90 with gaps): the shards' boxes (original pixels) with contiguous
    labels, mapped by categories.json, score AP 1 against the original annotation file."""
    root = coco_mini_preprocessed(shared_data, tmp_path, images=6)
    dataset = DetectionDataset(root, "val2017", train=False)
    categories = read_categories(root)
    assert any(c["label"] != c["id"] for c in categories)  # the mapping matters
    detections = []
    for _, target in (dataset[i] for i in range(len(dataset))):
        n = len(target["labels"])
        detections.append(
            ImageDetections(
                image_id=target["image_id"],
                boxes=target["boxes"].numpy(),
                scores=np.ones(n, dtype=np.float32),
                labels=target["labels"].numpy(),
                proposals=target["boxes"].numpy(),
                proposal_scores=np.ones(n, dtype=np.float32),
            )
        )
    image_ids = dataset.index.image_ids.tolist()
    gt = load_ground_truth(dataset.annotation_file)
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
        (
            {"bbox": ["a", 5, 20, 20]},
            r"bbox: must be 4 finite numbers \[x, y, w, h\], got \['a', 5, 20, 20\]",
        ),
        ({"bbox": "abcd"}, r"bbox: must be 4 finite numbers \[x, y, w, h\], got 'abcd'"),
        (
            {"bbox": [5, 5, math.inf, 20]},
            r"bbox: must be 4 finite numbers \[x, y, w, h\], got \[5, 5, inf, 20\]",
        ),
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
    with pytest.raises(
        EvaluationError, match=r"ground truth: annotations\[2\]\.bbox: must be 4 finite numbers"
    ):
        ground_truth_from_dict(gt)
    gt = tiny_gt()
    gt["annotations"][1]["image_id"] = True
    with pytest.raises(
        EvaluationError, match=r"ground truth: annotations\[1\]\.image_id: must be an integer"
    ):
        ground_truth_from_dict(gt)


# Streaming proposal recall: the same numbers as COCOeval (`proposal_recall`) on every case.

ImageProposals = tuple[int, np.ndarray, np.ndarray]  # (image_id, boxes (P, 4) xywh, scores (P,))


def as_results(proposals: list[ImageProposals]) -> list[dict]:
    """The per-image arrays as the dict list `proposal_recall` takes (same numbers, same order)."""
    return [
        {"image_id": image_id, "bbox": box, "score": score}
        for image_id, boxes, scores in proposals
        for box, score in zip(boxes.tolist(), scores.tolist(), strict=True)
    ]


def assert_same_recall(gt: COCO, proposals: list[ImageProposals], **kwargs: object) -> dict[str, float]:
    """streaming_proposal_recall == COCOeval's proposal_recall to 1e-9 for every key; returns it."""
    expected = proposal_recall(gt, as_results(proposals), **kwargs)
    got = streaming_proposal_recall(gt, iter(proposals), **kwargs)
    assert list(got) == list(PROPOSAL_KEYS)
    for key in PROPOSAL_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), (key, got, expected)
    return got


def jittered(rng: np.random.Generator, boxes: np.ndarray, count: int, *, step: float) -> np.ndarray:
    """(count, 4) xywh: random ground-truth boxes moved and resized by multiples of ``step`` px."""
    if len(boxes) == 0:
        return np.zeros((0, 4))
    picked = boxes[rng.integers(len(boxes), size=count)]
    return np.maximum(picked + rng.integers(-3, 4, size=(count, 4)) * step, [0, 0, 1, 1])


def random_boxes(rng: np.random.Generator, count: int, *, size: float, step: float) -> np.ndarray:
    """(count, 4) xywh on a grid of ``step`` px inside ``size`` x ``size`` (grids give exact IoU ties)."""
    cells = int(size // step)
    xy = rng.integers(0, cells, size=(count, 2)) * step
    wh = rng.integers(1, cells // 2, size=(count, 2)) * step
    return np.concatenate([xy, wh], axis=1).astype(np.float64)


def gt_boxes_by_image(gt: COCO) -> dict[int, np.ndarray]:
    """image id -> (G, 4) xywh of all its ground truth (crowd too)."""
    return {
        image_id: np.asarray([a["bbox"] for a in gt.imgToAnns.get(image_id, [])], dtype=np.float64).reshape(
            -1, 4
        )
        for image_id in gt.getImgIds()
    }


def test_streaming_recall_equals_cocoeval_on_real_val2014_detections(cocoapi_eval: Path) -> None:
    """cocoapi's 100 val2014 images (9 crowd boxes) and its fake detections as proposals, plus
    jittered ground truth with 2-decimal scores (ties) so there are more than 100 per image."""
    gt = load_ground_truth(cocoapi_eval / "instances_val2014_100.json")
    results = json.loads((cocoapi_eval / "instances_val2014_fakebbox100_results.json").read_text())
    rng = np.random.default_rng(0)
    proposals = []
    for image_id, truth in gt_boxes_by_image(gt).items():
        real = [r for r in results if r["image_id"] == image_id]
        extra = jittered(rng, truth, 150, step=2.0)
        boxes = np.concatenate([np.asarray([r["bbox"] for r in real]).reshape(-1, 4), extra])
        scores = np.concatenate([[r["score"] for r in real], rng.integers(0, 50, len(extra)) / 100])
        proposals.append((image_id, boxes, scores))
    recall = assert_same_recall(gt, proposals)
    assert 0 < recall["AR100"] < recall["AR1k"] < 1
    assert all(0 < recall[key] < 1 for key in ("ARs1k", "ARm1k", "ARl1k"))


def test_streaming_recall_equals_cocoeval_on_coco_mini(shared_data: Path) -> None:
    """coco-mini val2017 (80 images, 11 crowd RLE boxes, COCO ids with gaps): jittered and random
    proposals, more than 1000 on some images, none on others, evaluated on a subset of images."""
    gt = load_ground_truth(shared_data / "coco-mini" / "annotations" / "instances_val2017.json")
    rng = np.random.default_rng(1)
    proposals = []
    for n, (image_id, truth) in enumerate(gt_boxes_by_image(gt).items()):
        count = 0 if n % 9 == 4 else (1100 if n % 20 == 0 else 120)
        boxes = np.concatenate(
            [jittered(rng, truth, count // 2, step=1.5), random_boxes(rng, count // 2, size=640, step=16)]
        )
        proposals.append((image_id, boxes, rng.random(len(boxes)).astype(np.float32).astype(np.float64)))
    assert_same_recall(gt, proposals)
    assert_same_recall(gt, proposals, image_ids=gt.getImgIds()[::3])


def synthetic_case(seed: int, *, images: int = 24) -> tuple[COCO, list[ImageProposals]]:
    """Ground truth and proposals on a 16 px grid of a 256 px image, with what COCOeval's rules
    distinguish: crowd boxes, areas at 32^2 and 96^2 and one off, annotation id 0, three
    categories listed out of order, images without ground truth or without proposals, scores
    from 5 values (ties), more than 100 proposals on most images."""
    rng = np.random.default_rng(seed)
    annotations, proposals = [], []
    for image_id in range(1, images + 1):
        count = 0 if image_id % 6 == 0 else int(rng.integers(0, 9))
        boxes = random_boxes(rng, count, size=256, step=16)
        for box in boxes:
            area = (
                float(box[2] * box[3])
                if rng.random() < 0.6
                else float(rng.choice([1023, 1024, 1025, 9215, 9216, 9217]))
            )
            annotations.append(
                {"id": len(annotations), "image_id": image_id, "category_id": int(rng.choice([2, 5, 9])),
                 "bbox": box.tolist(), "area": area, "iscrowd": int(rng.random() < 0.15)}
            )  # fmt: skip
        if image_id % 5 == 0:
            proposals.append((image_id, np.zeros((0, 4)), np.zeros(0)))
            continue
        total = int(rng.integers(20, 260))
        near = jittered(rng, boxes, total // 2, step=8.0)
        boxes = np.concatenate([near, random_boxes(rng, total - len(near), size=256, step=16)])
        proposals.append((image_id, boxes, rng.integers(0, 5, len(boxes)) / 4))
    dataset = {
        "images": [{"id": i, "width": 256, "height": 256} for i in range(1, images + 1)],
        "annotations": annotations,
        "categories": [{"id": 9, "name": "c9"}, {"id": 2, "name": "c2"}, {"id": 5, "name": "c5"}],
    }
    return ground_truth_from_dict(dataset), proposals


@pytest.mark.parametrize("seed", range(6))
def test_streaming_recall_equals_cocoeval_on_synthetic_cases(seed: int) -> None:
    gt, proposals = synthetic_case(seed)
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])
    assert {1024.0, 9216.0} & {a["area"] for a in gt.dataset["annotations"]}
    assert_same_recall(gt, proposals)
    # Images never given count as without proposals; images outside image_ids are skipped.
    assert_same_recall(gt, proposals[::2])
    assert_same_recall(gt, proposals, image_ids=range(1, 13))


def test_streaming_recall_with_more_than_64_gts_and_1000_proposals() -> None:
    """70 gts on one image (two 64-bit words of gts per proposal), 1100 proposals (cut to 1000)."""
    rng = np.random.default_rng(7)
    truth = random_boxes(rng, 70, size=512, step=4)
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": box.tolist()} for i, box in enumerate(truth)
    ]
    gt = ground_truth_from_dict({"images": [{"id": 1}], "annotations": anns, "categories": [{"id": 1}]})
    boxes = np.concatenate([random_boxes(rng, 700, size=512, step=4), jittered(rng, truth, 400, step=2.0)])
    recall = assert_same_recall(gt, [(1, boxes, rng.random(len(boxes)))])
    assert recall["AR100"] < recall["AR1k"]


def test_streaming_recall_breaks_iou_ties_as_cocoeval() -> None:
    """A proposal with the same IoU (0.6) with two gts takes the one listed last (categories in
    id order), which can leave a later proposal without a match."""
    first, second = [0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]
    proposals = [(1, np.array([[2.5, 0.0, 10.0, 10.0], second]), np.array([0.9, 0.8]))]
    recalls = []
    for categories in ((1, 2), (2, 1)):  # `second` listed last, then first
        anns = [
            {"id": 1, "image_id": 1, "category_id": categories[0], "bbox": first},
            {"id": 2, "image_id": 1, "category_id": categories[1], "bbox": second},
        ]
        gt = ground_truth_from_dict(
            {"images": [{"id": 1}], "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
        )
        recalls.append(assert_same_recall(gt, proposals)["AR100"])
    assert recalls[0] == pytest.approx(0.5)  # `second` taken at IoU 0.6: the exact box finds nothing
    assert recalls[1] > recalls[0]


def test_streaming_recall_of_crowd_only_and_empty_cases() -> None:
    crowd = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1}
    dataset = {"images": [{"id": 1}, {"id": 2}], "annotations": [crowd], "categories": [{"id": 1}]}
    gt = ground_truth_from_dict(dataset)
    on_crowd = [(1, np.array([[0.0, 0.0, 50.0, 50.0], [10.0, 10.0, 20.0, 20.0]]), np.array([1.0, 0.5]))]
    assert assert_same_recall(gt, on_crowd) == {key: -1.0 for key in PROPOSAL_KEYS}
    tiny = ground_truth_from_dict(tiny_gt())
    assert assert_same_recall(tiny, []) == {key: 0.0 for key in PROPOSAL_KEYS}
    exact = [(image_id, boxes, np.ones(len(boxes))) for image_id, boxes in gt_boxes_by_image(tiny).items()]
    assert assert_same_recall(tiny, exact) == {key: pytest.approx(1.0) for key in PROPOSAL_KEYS}


def test_streaming_recall_refuses_bad_proposals() -> None:
    gt = ground_truth_from_dict(tiny_gt())
    box, score = np.array([[5.0, 5.0, 20.0, 20.0]]), np.array([0.9])
    with pytest.raises(EvaluationError, match=r"proposals: image id 999 is not in the ground truth"):
        streaming_proposal_recall(gt, [(10, box, score), (999, box, score)])
    with pytest.raises(EvaluationError, match=r"proposals: image id 10 given twice"):
        streaming_proposal_recall(gt, [(10, box, score), (11, box, score), (10, box, score)])
    with pytest.raises(
        EvaluationError, match=r"image 10: expected boxes \(P, 4\) and scores \(P,\), got \(4,\)"
    ):
        streaming_proposal_recall(gt, [(10, box[0], score)])
    with pytest.raises(EvaluationError, match=r"image 11: boxes and scores must be finite numbers"):
        streaming_proposal_recall(gt, [(11, box, np.array([math.nan]))])
    with pytest.raises(EvaluationError, match=r"image_id must be an integer, got True"):
        streaming_proposal_recall(gt, [(True, box, score)])
    with pytest.raises(EvaluationError, match="ground truth has no categories"):
        ProposalRecall(ground_truth_from_dict({"images": [{"id": 1}], "annotations": [], "categories": []}))


def test_streaming_recall_memory_does_not_grow_with_images() -> None:
    """Peak traced memory of 400 streamed images of 1000 proposals is that of 50 (give or take
    the set of ids seen)."""
    images = 400
    rng = np.random.default_rng(0)
    anns = [
        {"id": i + 1, "image_id": i // 5 + 1, "category_id": 1, "bbox": box.tolist()}
        for i, box in enumerate(random_boxes(rng, 5 * images, size=512, step=8))
    ]
    gt = ground_truth_from_dict(
        {"images": [{"id": i} for i in range(1, images + 1)], "annotations": anns, "categories": [{"id": 1}]}
    )
    truth = gt_boxes_by_image(gt)

    def stream(count: int) -> Iterator[ImageProposals]:
        for image_id in range(1, count + 1):
            boxes = np.concatenate(
                [jittered(rng, truth[image_id], 300, step=4.0), random_boxes(rng, 700, size=512, step=8)]
            )
            yield image_id, boxes, rng.random(1000)

    peaks = []
    for count in (50, images):
        tracemalloc.start()
        streaming_proposal_recall(gt, stream(count), image_ids=range(1, count + 1))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] + 256 * 1024, peaks
