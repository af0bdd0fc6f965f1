"""A quick AP on a few held-out images: the signal a hyperparameter sweep compares trials by.

`HoldoutSet` takes the first ``num_images`` images (by image id) of one preprocessed split, keeps
them decoded in memory, and scores a detector on them with pycocotools (`pipeline.evaluate.coco_eval`):
``{"val_ap50": AP at IoU .50, "val_ap": AP at IoU .50:.95}``.

Why AP and not a loss: the training loss depends on the very settings a sweep varies
(``model.roi_batch_per_image`` and ``model.rpn_batch_per_image`` change how many and which
RoIs/anchors are averaged over, ``model.anchor_sizes`` what counts as a positive anchor), so
losses of two trials are not comparable; AP on the same images is.

Conventions: everything is in the preprocessed (resized) frame -- the images as the model takes
them and the index's boxes -- so no annotation file outside the preprocess output is needed.
Category ids are the contiguous labels 1..K. ``crowd_boxes`` carry no label in the index and are
left out (a detection on a crowd region then counts as a false positive: a slightly pessimistic
AP, the same for every trial).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.dataset import DetectionDataset, read_categories
from pipeline.evaluate.coco_eval import evaluate_detections, ground_truth_from_dict
from pipeline.inference import detect

METRIC_NAMES = ("val_ap50", "val_ap")


@dataclass
class HoldoutSet:
    """The images (``(3, H, W)`` float 0..1) and ground truth of a few held-out images."""

    images: list[torch.Tensor]
    image_ids: list[int]
    ground_truth: Any  # pycocotools COCO, resized frame, category id = label
    batch_size: int = 4

    @classmethod
    def load(cls, data_root: str | Path, split: str, num_images: int, *, batch_size: int = 4) -> HoldoutSet:
        """The first ``num_images`` images (by image id) of ``<data_root>/<split>`` (fewer if the split has fewer).

        Raises ValueError naming the split when it has no image.
        """
        if num_images < 1:
            raise ValueError(f"num_images: must be >= 1, got {num_images}")
        dataset = DetectionDataset(data_root, split, train=False)
        if len(dataset) == 0:
            raise ValueError(f"{Path(data_root) / split}: no image to hold out for validation")
        order = sorted(range(len(dataset)), key=lambda i: int(dataset.records[i]["image_id"]))[:num_images]
        images, image_ids, gt_images, annotations = [], [], [], []
        for i in order:
            image, target = dataset[i]
            image_id = int(target["image_id"])
            images.append(image)
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
        gt = ground_truth_from_dict(
            {"images": gt_images, "annotations": annotations, "categories": categories},
            where=f"{Path(data_root) / split} (held-out images)",
        )
        return cls(images=images, image_ids=image_ids, ground_truth=gt, batch_size=batch_size)

    def __len__(self) -> int:
        return len(self.images)

    def evaluate(self, model: torch.nn.Module, device: torch.device | None = None) -> dict[str, float]:
        """``{"val_ap50", "val_ap"}`` of ``model`` (put in eval mode) on these images."""
        device = device or torch.device("cpu")
        model.to(device).eval()
        results: list[dict[str, Any]] = []
        for start in range(0, len(self.images), self.batch_size):
            batch = self.images[start : start + self.batch_size]
            detections, _ = detect(model, batch, device)
            for image_id, det in zip(
                self.image_ids[start : start + self.batch_size], detections, strict=True
            ):
                for (x1, y1, x2, y2), score, label in zip(
                    det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
                ):
                    results.append(
                        {
                            "image_id": image_id,
                            "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score),
                        }
                    )
        metrics = evaluate_detections(self.ground_truth, results, where="held-out detections").metrics
        # COCO's -1 ("no ground truth to measure") would read as a score: held-out images without
        # any box give 0.
        return {"val_ap50": max(metrics["AP50"], 0.0), "val_ap": max(metrics["AP"], 0.0)}
