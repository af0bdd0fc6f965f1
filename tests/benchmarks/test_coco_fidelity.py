"""benchmarks/coco_fidelity.py against torchvision, end to end, on real COCO images (coco-mini).

The same random (boosted) weights run twice on the first val2017 images of coco-mini: through
the pipeline (fetch --local-dir -> preprocess shards -> model file -> predict_split -> our
evaluator), and through torchvision's own ``fasterrcnn_resnet50_fpn`` on the original JPEGs read
here with PIL, its labels taken as COCO ids and scored by pycocotools' COCOeval directly. The
COCO numbers must agree: fetch, preprocess, loading, resizing, mapping back to original pixels
and category ids are all on the path. Random weights hit few objects (AP about 4e-6, AP50 2e-5 on
these 12 images), so beyond the numbers the test compares the detections one by one: the same
count, COCO ids, scores and boxes in original pixels (within the pipeline's 0.01 px rounding).
Measured 2026-12-01 on 2 loaded cores: 36-130 s (both models at 320/512).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.transforms.functional import pil_to_tensor

from benchmarks.coco_fidelity import random_coco_state_dict, run_pipeline
from pipeline.evaluate.coco_eval import STANDARD_KEYS

MIN_SIZE, MAX_SIZE = 320, 512  # small for a 2-core CPU; the same in both models
IMAGES = 12  # the first images of coco-mini's val2017 annotation file
SEED = 0


def torchvision_results(
    state: dict[str, torch.Tensor], folder: Path, images: list[dict[str, Any]]
) -> list[dict]:
    """torchvision's model on the original JPEGs: COCO results, label = category id, bbox xywh."""
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    model.load_state_dict(state)
    model.eval()
    results = []
    with torch.inference_mode():
        for info in images:
            with Image.open(folder / info["file_name"]) as image:
                pixels = pil_to_tensor(image.convert("RGB")).float() / 255.0  # (3, H, W) 0..1
            out = model([pixels])[0]
            xyxy = out["boxes"].numpy().astype(np.float64)
            xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            for box, score, label in zip(
                xywh.tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
            ):
                results.append({"image_id": info["id"], "category_id": label, "bbox": box, "score": score})
    return results


def cocoeval_stats(annotation_file: Path, results: list[dict], image_ids: list[int]) -> np.ndarray:
    """COCOeval's 12 bbox numbers, straight from pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def by_image(results: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image id: boxes (N, 4) xywh, scores (N,), category ids (N,), highest score first."""
    grouped: dict[int, list[dict]] = {}
    for r in results:
        grouped.setdefault(r["image_id"], []).append(r)
    out = {}
    for image_id, rows in grouped.items():
        rows.sort(key=lambda r: -r["score"])
        out[image_id] = (
            np.asarray([r["bbox"] for r in rows]),
            np.asarray([r["score"] for r in rows]),
            np.asarray([r["category_id"] for r in rows]),
        )
    return out


@pytest.mark.slow  # about 1.5 minutes on 2 cores: two R50-FPN models over 12 real images
def test_pipeline_ap_equals_torchvisions(shared_data: Path, tmp_path: Path) -> None:
    coco_mini = shared_data / "coco-mini"
    annotation_file = coco_mini / "annotations" / "instances_val2017.json"
    images = json.loads(annotation_file.read_text())["images"][:IMAGES]
    state = random_coco_state_dict(SEED)

    start = time.perf_counter()
    ours = run_pipeline(
        coco_mini, tmp_path, state, min_size=MIN_SIZE, max_size=MAX_SIZE, limit=IMAGES, progress=False
    )
    pipeline_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = torchvision_results(state, coco_mini / "val2017", images)
    reference_seconds = time.perf_counter() - start

    category_ids = {c["id"] for c in json.loads(annotation_file.read_text())["categories"]}
    scored = [r for r in theirs if r["category_id"] in category_ids]  # what COCOeval looks at
    stats = cocoeval_stats(annotation_file, theirs, [image["id"] for image in images])
    print(
        f"pipeline AP {ours.metrics['AP']:.3g} AP50 {ours.metrics['AP50']:.3g} ({ours.detections} detections, "
        f"{pipeline_seconds:.0f} s); torchvision AP {stats[0]:.3g} AP50 {stats[1]:.3g} "
        f"({len(scored)} detections, {reference_seconds:.0f} s)"
    )
    assert ours.images == IMAGES
    assert ours.detections > 0 and ours.detections == len(scored)
    assert ours.dropped == len(theirs) - len(scored)
    assert stats[1] > 0 and stats[8] > 0  # AP50, AR100: some true positives, not 0 == 0
    # The bar is 0.001; random weights give a small AP (about 4e-6 here), so also relative.
    for key, value in zip(STANDARD_KEYS, stats, strict=True):
        assert ours.metrics[key] == pytest.approx(value, abs=1e-3), key
        assert ours.metrics[key] == pytest.approx(value, rel=1e-2, abs=1e-9), key
    # The detections themselves: same images, category ids, scores and original-pixel boxes.
    ours_by_image, theirs_by_image = by_image(ours.results), by_image(scored)
    assert ours_by_image.keys() == theirs_by_image.keys()
    for image_id, (boxes, scores, labels) in theirs_by_image.items():
        our_boxes, our_scores, our_labels = ours_by_image[image_id]
        # The pipeline writes boxes rounded to 0.01 px and scores to 5 decimals (pipeline.inference).
        assert np.abs(our_boxes - boxes).max() < 0.01, image_id
        assert np.abs(our_scores - scores).max() < 1e-5, image_id
        assert (our_labels == labels).all(), image_id
