"""Periodic validation inside the training loop: a quick AP on a few held-out images, on the training device.

The signal a hyperparameter sweep compares trials by (stage tune sets
`pipeline.train.loop.TrainJob.validation`); the loop scores at every checkpoint, on rank 0, with
the live model on rank 0's device (`score_model`), so a GPU run scores on its GPU instead of
holding every worker at Ray Train's report barrier while a CPU scores a checkpoint.

* `ValidationSpec` -- what the job carries: data root, split, number of images (plain, picklable).
* `HoldoutSet` -- the first ``num_images`` images (by image id) of one preprocessed split, decoded
  once and kept in memory (uint8, 4x smaller than float and converted on the device), scored
  with pycocotools (`pipeline.evaluate.coco_eval`): ``{"val_ap50": AP at IoU .50, "val_ap": AP
  at IoU .50:.95}``.
* `score_model` -- `HoldoutSet.evaluate` that leaves training as it found it (see below).
* `mean_loss_since` -- ``train_loss``: the mean training loss of the steps since the previous
  validation, from the loop's history.

Why AP and not a loss: the training loss depends on the very settings a sweep varies
(``model.roi_batch_per_image`` and ``model.rpn_batch_per_image`` change how many and which
RoIs/anchors are averaged over, ``model.anchor_sizes`` what counts as a positive anchor), so
losses of two trials are not comparable; AP on the same images is.

Conventions: everything is in the stored images' pixels (original pixels: the model resizes
internally and maps its boxes back) -- the shards' images and boxes -- so no annotation file
outside the preprocess output is needed.
Category ids are the contiguous labels 1..K. ``crowd_boxes`` carry no label in the index and are
left out (a detection on a crowd region then counts as a false positive: a slightly pessimistic
AP, the same for every trial).

Scoring leaves training untouched, so a run with validation trains bit for bit like one without
(and resumes exactly): the forward passes run in eval mode under ``torch.no_grad`` -- not
``torch.inference_mode``: the model caches tensors it makes in a forward pass (the anchor grids
of `fpn.anchors`) and training steps reuse them; inference tensors there would break any
training op that saved one for backward or wrote to it in place (none does today, a trap
avoided) -- the model goes back to the mode it was in, and the random generators (CPU, and the
device's CUDA generator) are restored afterwards (``torch.random.fork_rng``; the detector's
eval forward draws nothing today, the restore keeps it so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dataset import DetectionDataset, read_categories, to_model_input
from pipeline.storage import join_location

METRIC_NAMES = ("val_ap50", "val_ap")
# What the loop adds to a checkpoint's report when validating (NaN on ranks other than 0).
VALIDATION_METRICS = (*METRIC_NAMES, "train_loss")


@dataclass(frozen=True)
class ValidationSpec:
    """Which held-out images the training loop scores, and when; plain and picklable.

    The loop scores the checkpoints at multiples of ``every`` iterations and the last one
    (``every`` is a multiple of ``train.checkpoint_every``: stage tune sets both to
    ``tune.eval_every``, stage train takes ``train.eval_every``).
    ``data_root`` must be visible from rank 0's worker (shared storage on a multi-node cluster).
    """

    data_root: str  # the preprocess output (``<split>/`` shards and index, ``categories.json``)
    split: str  # e.g. data.val_split
    num_images: int  # the first ``num_images`` images by image id (fewer if the split has fewer)
    every: int  # iterations between validations
    batch_size: int = 4  # images per forward pass

    def due(self, iteration: int, last: int) -> bool:
        """True at the iterations scored: multiples of ``every`` and ``last`` (train.iterations)."""
        return iteration % self.every == 0 or iteration >= last


@dataclass
class HoldoutSet:
    """The images (``(3, H, W)`` uint8, as decoded) and ground truth of a few held-out images."""

    images: list[torch.Tensor]
    image_ids: list[int]
    ground_truth: Any  # pycocotools COCO, the images' (original) pixels, category id = label
    batch_size: int = 4

    @classmethod
    def load(cls, data_root: str | Path, split: str, num_images: int, *, batch_size: int = 4) -> HoldoutSet:
        """The first ``num_images`` images (by image id) of ``<data_root>/<split>`` (fewer if the split has fewer).

        Raises ValueError naming the split when it has no image. Draws no random number.
        """
        if num_images < 1:
            raise ValueError(f"num_images: must be >= 1, got {num_images}")
        dataset = DetectionDataset(data_root, split, train=False)
        if len(dataset) == 0:
            raise ValueError(f"{join_location(str(data_root), split)}: no image to hold out for validation")
        order = np.argsort(dataset.index.image_ids, kind="stable")[:num_images].tolist()
        images, image_ids, gt_images, annotations = [], [], [], []
        for i in order:
            image, target = dataset[i]
            image_id = int(target["image_id"])
            images.append(image)  # uint8, as decoded
            image_ids.append(image_id)
            gt_images.append({"id": image_id, "width": int(image.shape[2]), "height": int(image.shape[1])})
            for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                x1, y1, x2, y2 = box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": int(c["label"]), "name": str(c.get("name", c["label"]))}
            for c in read_categories(data_root)
        ]
        # pycocotools is imported only when validation is on: the loop imports this module in
        # processes that have no pycocotools (the GPU smoke script on a bare torch machine).
        from pipeline.evaluate.coco_eval import ground_truth_from_dict

        gt = ground_truth_from_dict(
            {"images": gt_images, "annotations": annotations, "categories": categories},
            where=f"{join_location(str(data_root), split)} (held-out images)",
        )
        return cls(images=images, image_ids=image_ids, ground_truth=gt, batch_size=batch_size)

    @classmethod
    def from_spec(cls, spec: ValidationSpec) -> HoldoutSet:
        return cls.load(spec.data_root, spec.split, spec.num_images, batch_size=spec.batch_size)

    def __len__(self) -> int:
        return len(self.images)

    def evaluate(self, model: torch.nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """``{"val_ap50", "val_ap"}`` of ``model`` (moved to ``device``, put in eval mode) on these images.

        The images go to ``device`` a batch at a time, uint8, and become float 0..1 there.
        """
        device = device or torch.device("cpu")
        model.to(device).eval()
        results: list[dict[str, Any]] = []
        with torch.no_grad():
            for start in range(0, len(self.images), self.batch_size):
                batch = [
                    to_model_input(image, device) for image in self.images[start : start + self.batch_size]
                ]
                outputs = model(batch)
                for image_id, out in zip(
                    self.image_ids[start : start + self.batch_size], outputs, strict=True
                ):
                    for (x1, y1, x2, y2), score, label in zip(
                        out["boxes"].float().tolist(), out["scores"].float().tolist(), out["labels"].tolist(),
                        strict=True,
                    ):  # fmt: skip
                        results.append(
                            {
                                "image_id": image_id,
                                "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "score": float(score),
                            }
                        )
        from pipeline.evaluate.coco_eval import evaluate_detections  # lazy: see `HoldoutSet.load`

        metrics = evaluate_detections(self.ground_truth, results, where="held-out detections").metrics
        # COCO's -1 ("no ground truth to measure") would read as a score: held-out images without
        # any box give 0.
        return {"val_ap50": max(metrics["AP50"], 0.0), "val_ap": max(metrics["AP"], 0.0)}


def score_model(holdout: HoldoutSet, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """`HoldoutSet.evaluate` of a model being trained, on ``device``, leaving its training untouched.

    ``model`` must already be on ``device`` (the bare detector, not its DDP wrapper: only one rank
    scores). It goes back to the mode it was in; every random generator it could draw from is
    restored (see the module docstring).
    """
    was_training = model.training
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda):
            return holdout.evaluate(model, device)
    finally:
        model.train(was_training)


def mean_loss_since(history: list[list[float]], since: int) -> float:
    """Mean training loss of the steps after ``since`` (history rows ``[step, loss, ...]``); NaN if none."""
    losses = []
    for row in reversed(history):
        if row[0] <= since:
            break
        losses.append(row[1])
    losses.reverse()  # summed in step order
    return sum(losses) / len(losses) if losses else math.nan


def previous_validation(iteration: int, every: int) -> int:
    """The iteration of the validation before the one at ``iteration`` (0 at first).

    The loop validates every ``every`` steps and at the last (`ValidationSpec.due`).
    """
    return (iteration - 1) // every * every
