"""COCO evaluation of detections and of RPN proposals, through pycocotools' public API.

Conventions (COCO's):

* A detection result is ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``
  in the ORIGINAL image's pixel coordinates (what `COCO.loadRes` reads).
* The 12 standard bbox numbers are `COCOeval.stats` after ``summarize()``: AP (IoU .50:.95),
  AP50, AP75, APs, APm, APl (maxDets 100), AR1, AR10, AR100, ARs, ARm, ARl. A number COCO cannot
  compute (e.g. APs when the ground truth has no small object) is -1, as in COCO.
* Proposal recall (Table 1 of the FPN paper): class-agnostic (``params.useCats = 0``) average
  recall over IoU .50:.95 at 100 and 1000 proposals per image, overall and per object size:
  AR100, AR1k, ARs1k, ARm1k, ARl1k.

pycocotools traps handled here: ``loadRes([])`` raises (no detections is
evaluated against an empty result set instead: AP 0), ground truth without ``iscrowd``/``area``
raises (filled in: ``iscrowd = 0``, ``area = w * h`` of the box), results on image ids the ground
truth lacks fail an ``assert`` (checked first: `EvaluationError` naming the ids), and NaN
scores or string boxes are taken or crash deep inside: every result and ground-truth entry is
checked first (integer ``image_id``/``category_id``, never a bool; ``bbox`` 4 finite numbers;
``score`` a finite number), the error naming the source, the index and the key, e.g.
``results.json[3].score: must be a finite number, got nan``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STANDARD_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
PROPOSAL_KEYS = ("AR100", "AR1k", "ARs1k", "ARm1k", "ARl1k")
PROPOSAL_MAX_DETS = (100, 1000)
# Index of each area range in COCOeval.params.areaRng (its default order).
AREA_ALL, AREA_SMALL, AREA_MEDIUM, AREA_LARGE = 0, 1, 2, 3
# `contextlib.redirect_stdout` swaps the process-wide ``sys.stdout``: two threads evaluating at once
# (stages.ablate runs variants in parallel) would restore each other's buffer and leave stdout
# pointing at a StringIO for good. One lock makes every swap-and-restore whole.
_STDOUT_SWAP = threading.RLock()  # re-entrant: a quiet section may call another


@contextlib.contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    """Silence pycocotools' progress prints; thread-safe (swaps are serialized, never interleaved)."""
    with _STDOUT_SWAP, contextlib.redirect_stdout(io.StringIO()):
        yield


class EvaluationError(ValueError):
    """Ground truth or results that cannot be evaluated; the message names the file and the problem."""


@dataclass
class DetectionEvaluation:
    """What one COCO bbox evaluation yields.

    ``pr_recall`` holds COCO's 101 recall thresholds (0, 0.01, ..., 1); ``pr_precision_50`` and
    ``pr_precision_50_95`` the interpolated precision at each (area all, maxDets 100), averaged
    over the categories with ground truth (and, for .50:.95, over the 10 IoU thresholds).
    ``per_category_ap`` maps COCO category id -> AP .50:.95 for categories with ground truth.
    """

    metrics: dict[str, float]
    per_category_ap: dict[int, float] = field(default_factory=dict)
    pr_recall: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pr_precision_50: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pr_precision_50_95: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seconds: float = 0.0


def load_ground_truth(annotation_file: str | Path) -> COCO:
    """The ground truth as a `COCO` object, with ``iscrowd`` and ``area`` filled in where missing.

    Raises `EvaluationError` naming the file when it is missing, not JSON, or lacks ``images``,
    ``annotations`` or ``categories``. A file without ``info``/``licenses`` is fine.
    """
    path = Path(annotation_file)
    try:
        dataset = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path}: not a JSON file: {err}") from err
    return ground_truth_from_dict(dataset, where=str(path))


def ground_truth_from_dict(dataset: dict[str, Any], *, where: str = "ground truth") -> COCO:
    """`COCO` from an already parsed annotation dict (copied; see `load_ground_truth`)."""
    if not isinstance(dataset, dict):
        raise EvaluationError(f"{where}: expected a COCO annotation object, got {type(dataset).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if missing:
        raise EvaluationError(f"{where}: not a COCO instances file: missing key(s) {missing}")
    dataset = dict(dataset)
    annotations = []
    for i, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or "bbox" not in ann or "image_id" not in ann or "category_id" not in ann:
            raise EvaluationError(f"{where}: annotations[{i}] lacks bbox, image_id or category_id")
        _check_entry_values(ann, f"{where}: annotations[{i}]")
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        ann.setdefault("id", i + 1)
        annotations.append(ann)
    dataset["annotations"] = annotations
    coco = COCO()
    coco.dataset = dataset
    with _quiet_pycocotools():
        coco.createIndex()
    return coco


def read_results(
    results: str | Path | Sequence[dict[str, Any]], *, where: str | None = None
) -> list[dict[str, Any]]:
    """Detection results as a list of (copied) dicts, checked for the keys COCO needs.

    ``results`` is a COCO results JSON path or the list itself. Raises `EvaluationError` naming
    the source and the first bad entry.
    """
    if isinstance(results, (str, Path)):
        where = where or str(results)
        try:
            loaded = json.loads(Path(results).read_text())
        except FileNotFoundError:
            raise EvaluationError(f"{results}: results file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvaluationError(f"{results}: not a JSON file: {err}") from err
    else:
        loaded = results
    where = where or "results"
    if not isinstance(loaded, list):
        raise EvaluationError(f"{where}: expected a JSON list of detections, got {type(loaded).__name__}")
    checked = []
    for i, det in enumerate(loaded):
        if not isinstance(det, dict) or any(
            key not in det for key in ("image_id", "category_id", "bbox", "score")
        ):
            raise EvaluationError(
                f"{where}[{i}]: expected image_id, category_id, bbox and score, got {det!r}"
            )
        _check_entry_values(det, f"{where}[{i}]")
        if not _is_finite_number(det["score"]):
            raise EvaluationError(f"{where}[{i}].score: must be a finite number, got {det['score']!r}")
        checked.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [float(v) for v in det["bbox"]],
                "score": float(det["score"]),
            }
        )
    return checked


def _is_finite_number(value: Any) -> bool:
    """A real number (numpy's too; not a bool) that is neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_entry_values(entry: dict[str, Any], where: str) -> None:
    """Integer ``image_id``/``category_id`` and a ``bbox`` of 4 finite numbers, or `EvaluationError`
    naming ``where`` and the key."""
    for key in ("image_id", "category_id"):
        if not isinstance(entry[key], numbers.Integral) or isinstance(entry[key], bool):
            raise EvaluationError(f"{where}.{key}: must be an integer, got {entry[key]!r}")
    bbox = entry["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
        raise EvaluationError(f"{where}.bbox: must be 4 finite numbers [x, y, w, h], got {bbox!r}")


def _check_ids(gt: COCO, results: list[dict[str, Any]], where: str, *, check_categories: bool = True) -> None:
    unknown_images = sorted({d["image_id"] for d in results} - set(gt.getImgIds()))
    if unknown_images:
        shown = ", ".join(map(str, unknown_images[:10])) + (" ..." if len(unknown_images) > 10 else "")
        raise EvaluationError(f"{where}: {len(unknown_images)} image id(s) not in the ground truth: {shown}")
    if check_categories:
        unknown_cats = sorted({d["category_id"] for d in results} - set(gt.getCatIds()))
        if unknown_cats:
            raise EvaluationError(f"{where}: category id(s) not in the ground truth: {unknown_cats}")


def _results_coco(gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """`gt.loadRes(results)`, or an empty result set (``loadRes([])`` raises IndexError)."""
    with _quiet_pycocotools():
        if results:
            return gt.loadRes(copy.deepcopy(results))  # loadRes writes area/id/iscrowd into them
        empty = COCO()
        empty.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
        }
        empty.dataset["annotations"] = []
        empty.createIndex()
        return empty


def _mean_valid(values: np.ndarray) -> float:
    """Mean over entries > -1 (COCO marks 'no ground truth' with -1); -1 when none is valid."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def evaluate_detections(
    gt: COCO,
    results: str | Path | Sequence[dict[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    where: str | None = None,
) -> DetectionEvaluation:
    """COCO bbox evaluation of ``results`` against ``gt``.

    ``image_ids`` restricts the evaluation to those images (default: every ground-truth image,
    as cocoapi does); results on other images are then ignored.
    """
    start = time.perf_counter()
    where = where or (str(results) if isinstance(results, (str, Path)) else "results")
    dets = read_results(results, where=where)
    _check_ids(gt, dets, where)
    evaluator = COCOeval(gt, _results_coco(gt, dets), iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(set(image_ids))
    with _quiet_pycocotools():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {key: float(value) for key, value in zip(STANDARD_KEYS, evaluator.stats, strict=True)}

    # precision: (T IoU thresholds, R recall thresholds, K categories, A areas, M maxDets)
    precision = evaluator.eval["precision"]
    per_category = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        ap = _mean_valid(precision[:, :, k, AREA_ALL, -1])
        if ap > -1:
            per_category[int(cat_id)] = ap
    all_area = precision[:, :, :, AREA_ALL, -1]  # (T, R, K)
    has_gt = (all_area > -1).all(axis=(0, 1))  # (K,) categories with ground truth
    if has_gt.any():
        pr_50 = all_area[0][:, has_gt].mean(axis=1)  # (R,)
        pr_50_95 = all_area[:, :, has_gt].mean(axis=(0, 2))  # (R,)
    else:
        pr_50 = pr_50_95 = np.zeros_like(evaluator.params.recThrs)
    return DetectionEvaluation(
        metrics=metrics,
        per_category_ap=per_category,
        pr_recall=np.asarray(evaluator.params.recThrs, dtype=float),
        pr_precision_50=np.asarray(pr_50, dtype=float),
        pr_precision_50_95=np.asarray(pr_50_95, dtype=float),
        seconds=time.perf_counter() - start,
    )


def coco_metrics(
    annotation_file: str | Path,
    results: str | Path | Sequence[dict[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """The 12 standard COCO bbox numbers (keys `STANDARD_KEYS`) of ``results`` (a results JSON path
    or list) against the annotation file. No detections gives 0 (and -1 where COCO has no ground
    truth to measure); unknown image ids raise `EvaluationError` naming them."""
    return evaluate_detections(load_ground_truth(annotation_file), results, image_ids=image_ids).metrics


def proposal_recall(
    gt: COCO,
    proposals: Sequence[dict[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Class-agnostic average recall of proposals (keys `PROPOSAL_KEYS`), as in Table 1 of the paper.

    ``proposals``: ``{"image_id", "bbox": [x, y, w, h], "score"}`` in original image pixels, at most
    1000 per image (more are cut by score). COCOeval runs with ``useCats = 0`` and
    ``maxDets = [100, 1000]``; each proposal gets the first ground-truth category id, which
    class-agnostic matching ignores.
    """
    if not gt.getCatIds():
        raise EvaluationError("ground truth has no categories: proposal recall needs one category id")
    any_cat = gt.getCatIds()[0]
    dets = [
        {
            "image_id": p["image_id"],
            "category_id": any_cat,
            "bbox": [float(v) for v in p["bbox"]],
            "score": float(p["score"]),
        }
        for p in proposals
    ]
    _check_ids(gt, dets, "proposals", check_categories=False)
    evaluator = COCOeval(gt, _results_coco(gt, dets), iouType="bbox")
    evaluator.params.useCats = 0
    evaluator.params.maxDets = list(PROPOSAL_MAX_DETS)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(set(image_ids))
    with _quiet_pycocotools():
        evaluator.evaluate()
        evaluator.accumulate()
    # recall: (T IoU thresholds, K=1 since useCats=0, A areas, M maxDets); mean over T = AR
    recall = evaluator.eval["recall"]
    return {
        "AR100": _mean_valid(recall[:, 0, AREA_ALL, 0]),
        "AR1k": _mean_valid(recall[:, 0, AREA_ALL, 1]),
        "ARs1k": _mean_valid(recall[:, 0, AREA_SMALL, 1]),
        "ARm1k": _mean_valid(recall[:, 0, AREA_MEDIUM, 1]),
        "ARl1k": _mean_valid(recall[:, 0, AREA_LARGE, 1]),
    }
