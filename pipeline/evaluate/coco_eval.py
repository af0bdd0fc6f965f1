"""COCO evaluation of detections and of RPN proposals, through pycocotools' public API.

Conventions (COCO's):

* A detection result is ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``
  in the ORIGINAL image's pixel coordinates (what `COCO.loadRes` reads).
* The 12 standard bbox numbers are `COCOeval.stats` after ``summarize()``: AP (IoU .50:.95),
  AP50, AP75, APs, APm, APl (maxDets 100), AR1, AR10, AR100, ARs, ARm, ARl. A number COCO cannot
  compute (e.g. APs when the ground truth has no small object) is -1, as in COCO.
* Proposal recall (Table 1 of the FPN paper): class-agnostic (``params.useCats = 0``) average
  recall over IoU .50:.95 at 100 and 1000 proposals per image, overall and per object size:
  AR100, AR1k, ARs1k, ARm1k, ARl1k. `proposal_recall` runs one COCOeval over a list of dicts
  (per image of 1000 proposals about 2.4 MB held to the end and 75 ms of CPU);
  `streaming_proposal_recall` / `ProposalRecall` take the proposals image by image as arrays,
  keep only match counts (constant memory, about 1 ms per image) and give the same numbers (see
  `ProposalRecall` for why). Figures: benchmarks/bench_proposal_recall.py.

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
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

STANDARD_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
PROPOSAL_KEYS = ("AR100", "AR1k", "ARs1k", "ARm1k", "ARl1k")
PROPOSAL_MAX_DETS = (100, 1000)
# Index of each area range in COCOeval.params.areaRng (its default order).
AREA_ALL, AREA_SMALL, AREA_MEDIUM, AREA_LARGE = 0, 1, 2, 3
# COCOeval's bbox defaults: area ranges (A, 2) [lo, hi] in px^2 (all, small, medium, large) and the
# IoU thresholds .50:.05:.95 (T,). A detection matches a gt at IoU >= min(threshold, 1 - 1e-10).
_AREA_RANGES = np.asarray(Params(iouType="bbox").areaRng, dtype=np.float64)
_MATCH_THRESHOLDS = np.minimum(np.asarray(Params(iouType="bbox").iouThrs, dtype=np.float64), 1 - 1e-10)
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
        if (
            not isinstance(ann, dict)
            or "bbox" not in ann
            or "image_id" not in ann
            or "category_id" not in ann
        ):
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


@dataclass(frozen=True)
class _ImageGroundTruth:
    """One image's ground truth as proposal recall needs it: its non-crowd boxes only (see `ProposalRecall`).

    ``boxes`` (G, 4) float64 xywh in COCOeval's order with ``useCats = 0`` (by category id, then
    as listed); ``in_range`` (A, G) bool, box g's ``area`` lies in area range a (COCOeval's test
    ``not (area < lo or area > hi)``); ``counted`` (G,) bool, a match to box g counts as found
    (COCOeval records a match as the gt's id, so a gt with id 0 is matched but never counted).
    """

    boxes: np.ndarray
    in_range: np.ndarray
    counted: np.ndarray


def _image_ground_truth(gt: COCO, image_id: int, category_ids: frozenset[int]) -> _ImageGroundTruth:
    """The non-crowd ground truth of ``image_id`` in the categories ``category_ids`` (none: G = 0)."""
    anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) if a["category_id"] in category_ids]
    anns.sort(key=lambda a: a["category_id"])  # stable: by category id, then as listed
    kept = [a for a in anns if not a.get("iscrowd")]
    area = np.asarray([a["area"] for a in kept], dtype=np.float64)  # (G,)
    outside = (area < _AREA_RANGES[:, :1]) | (area > _AREA_RANGES[:, 1:])  # (A, G)
    return _ImageGroundTruth(
        boxes=np.asarray([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4),
        in_range=~outside,
        counted=np.asarray([a["id"] != 0 for a in kept], dtype=bool),
    )


def _checked_proposals(image_id: Any, boxes: Any, scores: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """``(image_id, boxes (P, 4) float64, scores (P,) float64)``, or `EvaluationError` naming the image."""
    if not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool):
        raise EvaluationError(f"proposals: image_id must be an integer, got {image_id!r}")
    where = f"proposals of image {image_id}"
    try:
        boxes = np.asarray(boxes, dtype=np.float64)
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"{where}: boxes and scores must be numbers: {err}") from err
    if boxes.size == 0 and scores.size == 0:
        return int(image_id), boxes.reshape(0, 4), scores.reshape(0)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise EvaluationError(
            f"{where}: expected boxes (P, 4) and scores (P,), got {boxes.shape} and {scores.shape}"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise EvaluationError(f"{where}: boxes and scores must be finite numbers")
    return int(image_id), boxes, scores


def _pack_rows(bits: np.ndarray) -> np.ndarray:
    """(..., G) bool -> (..., K) uint64 bit sets, K = ceil(G / 64): one AND tests 64 gts at once."""
    words = -(-bits.shape[-1] // 64)
    padded = np.zeros((*bits.shape[:-1], 64 * words), dtype=bool)
    padded[..., : bits.shape[-1]] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view(np.uint64)


def _greedy_matches(ious: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval's greedy matching for B independent problems at once.

    ``ious`` (D, G): IoU of the proposals (highest score first) with the gts; ``eligible``
    (B, D, G) bool: problem b may match proposal d to gt g. In each problem, proposal by proposal,
    a proposal takes the gt of highest IoU (the last one on ties) among its eligible gts not taken
    yet, or none. Each step jumps every problem to its next proposal with an eligible gt left (the
    proposals passed over match nothing, as the gts left only shrink): at most G + 1 steps, each
    over the problems still matching, the gts packed 64 to a word.

    Returns the matches as three (N,) index arrays: problem, proposal, gt.
    """
    num_problems, num_dets, num_gts = eligible.shape
    eligible_words = _pack_rows(eligible)  # (B, D, K)
    free = np.ones((num_problems, num_gts), dtype=bool)
    first_det = np.zeros(num_problems, dtype=np.int64)  # where each problem goes on
    alive = np.arange(num_problems)  # the problems that may match again
    det_index = np.arange(num_dets)
    problems, dets, gts = [], [], []
    while alive.size:
        free_words = _pack_rows(free[alive])  # (n, K)
        waiting = (eligible_words[alive] & free_words[:, None, :]).any(axis=2)  # (n, D)
        waiting &= det_index >= first_det[alive, None]
        matching = waiting.any(axis=1)
        alive, waiting = alive[matching], waiting[matching]
        if not alive.size:
            break
        det = waiting.argmax(axis=1)  # the first proposal that can match
        options = np.where(eligible[alive, det] & free[alive], ious[det], -np.inf)  # (n, G)
        gt = num_gts - 1 - options[:, ::-1].argmax(axis=1)  # the highest IoU, the last gt on ties
        free[alive, gt] = False
        first_det[alive] = det + 1
        problems.append(alive)
        dets.append(det)
        gts.append(gt)
    if not problems:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(problems), np.concatenate(dets), np.concatenate(gts)


def _match_counts(boxes: np.ndarray, truth: _ImageGroundTruth) -> np.ndarray:
    """(A, T, M) int64: the gts of ``truth`` found per area range, IoU threshold and max proposals.

    ``boxes`` (D, 4) float64 xywh: the image's proposals, highest score first, at most the last of
    `PROPOSAL_MAX_DETS`. IoU by ``pycocotools.mask.iou`` (the same numbers as COCOeval's). Only
    proposals that reach the lowest threshold with some gt in some area range take part.
    """
    shape = (len(_AREA_RANGES), len(_MATCH_THRESHOLDS), len(PROPOSAL_MAX_DETS))
    num_gts = truth.boxes.shape[0]
    if boxes.shape[0] == 0 or num_gts == 0:
        return np.zeros(shape, dtype=np.int64)
    ious = np.asarray(mask_utils.iou(boxes, truth.boxes, np.zeros(num_gts, dtype=np.uint8)))  # (D, G)
    reachable = (ious >= _MATCH_THRESHOLDS.min()) & truth.in_range.any(axis=0)
    candidates = np.flatnonzero(reachable.any(axis=1))  # (C,) ranks of the proposals that can match
    ious = ious[candidates]  # (C, G)
    above = ious[None, :, :] >= _MATCH_THRESHOLDS[:, None, None]  # (T, C, G)
    eligible = above[None] & truth.in_range[:, None, None, :]  # (A, T, C, G)
    problem, det, gt = _greedy_matches(ious, eligible.reshape(shape[0] * shape[1], *ious.shape))
    rank, counted = candidates[det], truth.counted[gt]
    counts = np.zeros(shape, dtype=np.int64)
    for m, max_det in enumerate(PROPOSAL_MAX_DETS):
        found = problem[counted & (rank < max_det)]
        counts[:, :, m] = np.bincount(found, minlength=shape[0] * shape[1]).reshape(shape[:2])
    return counts


class ProposalRecall:
    """Proposal recall fed image by image: COCOeval's numbers (`proposal_recall`) in constant memory.

    Keeps per area range, IoU threshold and max proposals (100, 1000) the number of gts found,
    and per area range the number of gts to find; add images with `add`, read with `result`.
    Memory beyond ``gt``: one image's work and the set of image ids seen.

    Why these are COCOeval's numbers (``useCats = 0``, its ``evaluateImg`` then ``accumulate``):
    per image the top 1000 proposals by score (stable sort, ties in input order) are matched
    greedily, highest score first, each to the unmatched gt of highest IoU >= the threshold
    (the last one on ties), the gts 'ignored' for the area range (crowd, or area outside it)
    sorted last and tried only when no other gt matches; a crowd gt may be matched again. Recall
    is the number of proposals matched to a gt not ignored (among the first 100 or 1000) over the
    number of gts not ignored, summed over images; -1 when there are none. A proposal tries the
    ignored gts only once the others failed it, so matches to ignored gts never change which
    other gts get matched, and they never count: recall is the same greedy matching run on the
    non-ignored gts alone. Crowd gts are always ignored, so they drop out (their IoU rule too).

    Why numpy matching rather than COCOeval per chunk of images, summing counts from its
    ``evalImgs``: chunks bound the memory too, but keep COCOeval's pure-Python loop over
    thresholds x proposals x gts (about 60 ms of CPU per image of 1000 proposals); here one image
    takes about 1 ms, all 40 (area range, threshold) matchings at once.
    """

    def __init__(self, gt: COCO, *, image_ids: Iterable[int] | None = None) -> None:
        """``image_ids`` restricts the evaluation to those images (default: every ground-truth image)."""
        if not gt.getCatIds():
            raise EvaluationError("ground truth has no categories: proposal recall needs one category id")
        self._gt = gt
        self._categories = frozenset(gt.getCatIds())
        self._image_ids = frozenset(int(i) for i in (gt.getImgIds() if image_ids is None else image_ids))
        self._seen: set[int] = set()
        self._found = np.zeros((len(_AREA_RANGES), len(_MATCH_THRESHOLDS), len(PROPOSAL_MAX_DETS)), np.int64)
        self._to_find = np.zeros(len(_AREA_RANGES), dtype=np.int64)

    def add(self, image_id: int, boxes: np.ndarray, scores: np.ndarray) -> None:
        """Count one image's proposals: ``boxes`` (P, 4) xywh in original image pixels, ``scores`` (P,).

        Raises `EvaluationError` for an image id not in the ground truth or given twice, or bad arrays.
        Images outside ``image_ids`` are checked, then skipped.
        """
        image_id, boxes, scores = _checked_proposals(image_id, boxes, scores)
        if image_id not in self._gt.imgs:
            raise EvaluationError(f"proposals: image id {image_id} is not in the ground truth")
        if image_id in self._seen:
            raise EvaluationError(f"proposals: image id {image_id} given twice")
        self._seen.add(image_id)
        if image_id not in self._image_ids:
            return
        truth = _image_ground_truth(self._gt, image_id, self._categories)
        ranked = np.argsort(-scores, kind="mergesort")[: PROPOSAL_MAX_DETS[-1]]  # COCOeval's order
        self._found += _match_counts(boxes[ranked], truth)
        self._to_find += truth.in_range.sum(axis=1)

    def result(self) -> dict[str, float]:
        """AR100, AR1k, ARs1k, ARm1k, ARl1k (`PROPOSAL_KEYS`); images never added count as without proposals."""
        to_find = self._to_find.copy()
        for image_id in self._image_ids - self._seen:
            to_find += _image_ground_truth(self._gt, image_id, self._categories).in_range.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = self._found / to_find[:, None, None]  # (A, T, M)
        recall[to_find == 0] = -1.0
        return {
            "AR100": _mean_valid(recall[AREA_ALL, :, 0]),
            "AR1k": _mean_valid(recall[AREA_ALL, :, 1]),
            "ARs1k": _mean_valid(recall[AREA_SMALL, :, 1]),
            "ARm1k": _mean_valid(recall[AREA_MEDIUM, :, 1]),
            "ARl1k": _mean_valid(recall[AREA_LARGE, :, 1]),
        }


def streaming_proposal_recall(
    gt: COCO,
    proposals: Iterable[tuple[int, np.ndarray, np.ndarray]],
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """`proposal_recall`'s numbers from ``(image_id, boxes (P, 4) xywh, scores (P,))`` per image.

    ``proposals`` is consumed one image at a time (e.g. `pipeline.inference.proposal_arrays`);
    memory does not grow with the number of images (see `ProposalRecall`).
    """
    recall = ProposalRecall(gt, image_ids=image_ids)
    for image_id, boxes, scores in proposals:
        recall.add(image_id, boxes, scores)
    return recall.result()
