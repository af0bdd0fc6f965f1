"""Proposal recall: time and peak memory of COCOeval over one list of dicts vs streamed counts.

    .venv/bin/python benchmarks/bench_proposal_recall.py                  # 500 images x 1000 proposals, every variant
    .venv/bin/python benchmarks/bench_proposal_recall.py --images 500 2000 --variants streaming
    .venv/bin/python benchmarks/bench_proposal_recall.py --chunk 100      # chunked COCOeval, 100 images a chunk

Variants, each on the same seeded synthetic split (per image 3..11 ground-truth boxes of every
size, 2% crowd, and 1000 proposals, a third of them jittered ground truth, float32 scores), from
the `ImageDetections` list (xyxy) that `pipeline.inference.predict_split` returns:

    cocoeval   today's `proposal_recall(gt, proposal_results(detections))`: one COCOeval
    chunked    COCOeval per chunk of ``--chunk`` images, recall counts summed from ``evalImgs``
               (the alternative not taken: bounded memory, COCOeval's speed)
    streaming  `streaming_proposal_recall(gt, proposal_arrays(detections))`: numpy, per image

Each variant runs in a fresh Python process (ground truth and detections built, every code path
warmed on two images) so that its peak memory is its own: the figure is the growth of the peak
resident set (``resource.getrusage`` ru_maxrss) during the call, over the process's peak before
it (its resolution, how far the setup's peak lies above the resident set, is printed last).
Prints the machine and the date, then per variant and image count: wall and CPU seconds, CPU
ms per image, peak RSS growth (MB), and the five numbers, which must agree across variants.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.evaluate.coco_eval import (
    PROPOSAL_KEYS,
    PROPOSAL_MAX_DETS,
    ground_truth_from_dict,
    proposal_recall,
    streaming_proposal_recall,
)
from pipeline.inference import ImageDetections, proposal_arrays, proposal_results
from pipeline.profile.timing import machine_description

VARIANTS = ("cocoeval", "chunked", "streaming")
WIDTH, HEIGHT = 640, 480
MB = 2**20


def synthetic_split(images: int, proposals: int, *, seed: int = 0) -> tuple[COCO, list[ImageDetections]]:
    """Ground truth (COCO) and per-image detections with ``proposals`` proposals (xyxy float32)."""
    rng = np.random.default_rng(seed)
    annotations, detections = [], []
    for image_id in range(1, images + 1):
        count = int(rng.integers(3, 12))
        side = np.exp(rng.uniform(np.log(8), np.log(400), size=(count, 2)))  # every COCO size
        xy = rng.uniform(0, 1, size=(count, 2)) * np.maximum([WIDTH, HEIGHT] - side, 1)
        truth = np.concatenate([xy, side], axis=1).round(2)  # xywh
        for box in truth:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                 "bbox": box.tolist(), "iscrowd": int(rng.random() < 0.02)}
            )  # fmt: skip
        near = truth[rng.integers(count, size=proposals // 3)]
        near = near + rng.normal(0, 0.1, size=near.shape) * near[:, [2, 3, 2, 3]]
        far_xy = rng.uniform(0, 1, size=(proposals - len(near), 2)) * [WIDTH, HEIGHT]
        far = np.concatenate([far_xy, np.exp(rng.uniform(np.log(4), np.log(500), size=far_xy.shape))], axis=1)
        xywh = np.concatenate([near, far])
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + np.abs(xywh[:, 2:])], axis=1).astype(np.float32)
        detections.append(
            ImageDetections(
                image_id=image_id,
                boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32),
                labels=np.zeros(0, np.int64),
                proposals=xyxy,
                proposal_scores=rng.random(proposals, dtype=np.float32),
            )
        )
    gt = ground_truth_from_dict(
        {
            "images": [{"id": i, "width": WIDTH, "height": HEIGHT} for i in range(1, images + 1)],
            "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
        }
    )
    return gt, detections


def _chunks(detections: list[ImageDetections], size: int) -> Iterator[list[ImageDetections]]:
    for start in range(0, len(detections), size):
        yield detections[start : start + size]


def chunked_cocoeval_recall(gt: COCO, detections: list[ImageDetections], *, chunk: int) -> dict[str, float]:
    """Proposal recall by one COCOeval (useCats 0) per chunk of images, summing from ``evalImgs``
    per area range, IoU threshold and max detections the matched non-ignored proposals, and per
    area range the non-ignored gts. Every image needs a proposal (``loadRes([])`` raises)."""
    any_category = gt.getCatIds()[0]
    found = np.zeros((4, 10, len(PROPOSAL_MAX_DETS)), dtype=np.int64)  # (A, T, M)
    to_find = np.zeros(4, dtype=np.int64)
    for part in _chunks(detections, chunk):
        results = [dict(r, category_id=any_category) for r in proposal_results(part)]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
            evaluator.params.useCats = 0
            evaluator.params.maxDets = list(PROPOSAL_MAX_DETS)
            evaluator.params.imgIds = [d.image_id for d in part]
            evaluator.evaluate()
        ranges = [tuple(r) for r in evaluator.params.areaRng]
        for image in evaluator.evalImgs:
            if image is None:
                continue
            area = ranges.index(tuple(image["aRng"]))
            to_find[area] += int(np.count_nonzero(image["gtIgnore"] == 0))
            for m, max_det in enumerate(PROPOSAL_MAX_DETS):
                matched = image["dtMatches"][:, :max_det] != 0
                ignored = image["dtIgnore"][:, :max_det].astype(bool)
                found[area, :, m] += (matched & ~ignored).sum(axis=1)
    recall = np.where(to_find[:, None, None] > 0, found / np.maximum(to_find, 1)[:, None, None], -1.0)
    keys = {"AR100": (0, 0), "AR1k": (0, 1), "ARs1k": (1, 1), "ARm1k": (2, 1), "ARl1k": (3, 1)}
    return {key: _mean_valid(recall[a, :, m]) for key, (a, m) in keys.items()}


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def run_variant(variant: str, gt: COCO, detections: list[ImageDetections], chunk: int) -> dict[str, float]:
    if variant == "cocoeval":
        return proposal_recall(gt, proposal_results(detections))
    if variant == "chunked":
        return chunked_cocoeval_recall(gt, detections, chunk=chunk)
    return streaming_proposal_recall(gt, proposal_arrays(detections))


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant: str, images: int, proposals: int, chunk: int) -> None:
    """Build the case, warm up on two images, then time one call; prints one JSON line. ``slack``:
    how far the peak before the call lies above the resident set then (growth below it is unseen)."""
    run_variant(variant, *synthetic_split(2, proposals, seed=1), chunk)  # warm-up
    gt, detections = synthetic_split(images, proposals)
    before = peak_rss_bytes()
    slack = before - rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    recall = run_variant(variant, gt, detections, chunk)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_bytes()
    print(json.dumps({"wall": wall, "cpu": cpu, "growth": peak - before, "slack": slack, "recall": recall}))


def machine() -> str:
    """CPU model, usable cores, OS, Python, numpy and pycocotools versions."""
    info = machine_description("cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{info['cpu']}, {cores} cores usable, {platform.platform()}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, pycocotools {version('pycocotools')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[500], help="image counts (default 500)")
    p.add_argument("--proposals", type=int, default=1000, help="proposals per image (default 1000)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk", type=int, default=50, help="images per COCOeval of 'chunked' (default 50)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.images[0], args.proposals, args.chunk)
        return
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"case: synthetic, {args.proposals} proposals per image, chunk {args.chunk} images (chunked)")
    print(f"{'variant':<10} {'images':>6} {'wall s':>8} {'cpu s':>8} {'cpu ms/img':>10} {'peak RSS +MB':>12}  "
          + " ".join(f"{k:>8}" for k in PROPOSAL_KEYS))  # fmt: skip
    slack = 0
    for images in args.images:
        numbers = {}
        for variant in args.variants:
            command = [sys.executable, __file__, "--child", variant, "--images", str(images),
                       "--proposals", str(args.proposals), "--chunk", str(args.chunk)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            out = json.loads(done.stdout.strip().splitlines()[-1])
            numbers[variant] = out["recall"]
            slack = max(slack, out["slack"])
            print(
                f"{variant:<10} {images:>6} {out['wall']:>8.2f} {out['cpu']:>8.2f} "
                f"{1000 * out['cpu'] / images:>10.2f} {out['growth'] / MB:>12.1f}  "
                + " ".join(f"{out['recall'][k]:>8.5f}" for k in PROPOSAL_KEYS),
                flush=True,
            )
        if len(numbers) > 1:
            reference = next(iter(numbers.values()))
            worst = max(abs(n[k] - reference[k]) for n in numbers.values() for k in PROPOSAL_KEYS)
            print(f"{'':<10} {images:>6} largest difference between variants: {worst:.3g}")
    print(
        f"peak RSS +MB: growth of ru_maxrss during the call; resolution {slack / MB:.1f} MB (setup peak above RSS)"
    )


if __name__ == "__main__":
    main()
