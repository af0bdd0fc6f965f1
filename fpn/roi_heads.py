"""Fast R-CNN head on the pyramid (Sec. 4.2 of the FPN paper).

"We simply attach predictor heads (in Fast R-CNN the heads are class-specific classifiers
and bounding box regressors) to all RoIs of all levels ... we adopt ... a 2-fc MLP head ...
Each fc layer is followed by ReLU ... 1024-d fc layers". In training, 512 RoIs per image are
sampled with up to 25% foreground (IoU >= 0.5 with a ground-truth box; background below 0.5),
ground-truth boxes joining the proposals. At test time: softmax scores, class-specific boxes,
clipping, a score threshold, per-class NMS and the top detections per image.

Shape shorthand:
    N: images, R: RoIs over the batch (R_i of image i), C: channels of the pyramid (d),
    S: pooled size (7), K: foreground classes (num_classes), D: representation size (1024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from fpn.boxes import clip_boxes, decode_boxes, encode_boxes, nonempty_mask
from fpn.poolers import MultiLevelRoIAlign
from fpn.rpn import SMOOTH_L1_BETA, sample_labels

# Detections narrower or lower than this many pixels (network input) are dropped.
MIN_DETECTION_SIZE = 1e-2


class TwoMLPHead(nn.Module):
    """(R, C, S, S) pooled features -> (R, D): flatten, fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, *, in_features: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """(R, D) -> class logits (R, K+1) and class-specific box deltas (R, 4(K+1)), laid out as
    (K+1, 4); column 0 is the background."""

    def __init__(self, *, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Pool each RoI from its pyramid level, classify it and refine its box.

    Args:
        pooler: `MultiLevelRoIAlign` (Eq. (1) level assignment + RoIAlign).
        box_head: `TwoMLPHead`.
        predictor: `BoxPredictor`.
        fg_iou, bg_iou: RoI labelling thresholds (0.5, 0.5).
        batch_per_image, positive_fraction: RoI sampling (512, 0.25).
        box_reg_weights: (wx, wy, ww, wh) of the box coding, (10, 10, 5, 5).
        score_thresh, nms_iou, detections_per_image: test-time post-processing.
    """

    def __init__(
        self,
        *,
        pooler: MultiLevelRoIAlign,
        box_head: nn.Module,
        predictor: BoxPredictor,
        fg_iou: float,
        bg_iou: float,
        batch_per_image: int,
        positive_fraction: float,
        box_reg_weights: tuple[float, float, float, float],
        score_thresh: float,
        nms_iou: float,
        detections_per_image: int,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.fg_iou = fg_iou
        self.bg_iou = bg_iou
        self.batch_per_image = batch_per_image
        self.positive_fraction = positive_fraction
        self.box_reg_weights = tuple(box_reg_weights)
        self.score_thresh = score_thresh
        self.nms_iou = nms_iou
        self.detections_per_image = detections_per_image

    def forward(
        self,
        features: dict[int, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Detections per image (boxes (D_i, 4) in the resized frame, scores, labels) outside
        training; the losses ``loss_cls`` and ``loss_box`` in training."""
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads: targets are needed in training mode")
            proposals, labels, regression_targets = self.label_and_sample_proposals(proposals, targets)
        x = self.box_head(self.pooler(features, proposals))  # (R, D)
        class_logits, box_deltas = self.predictor(x)  # (R, K+1), (R, 4(K+1))
        if self.training:
            return [], self.losses(class_logits, box_deltas, labels, regression_targets)
        return self.predict_boxes(class_logits, box_deltas, proposals, image_sizes), {}

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Add the GT boxes to the proposals, label them, sample ``batch_per_image`` per image.

        Returns the sampled RoIs per image, their labels (R,) in 0..K and regression targets
        (R, 4) (zeros for background RoIs).
        """
        sampled_boxes, all_labels, all_targets = [], [], []
        for boxes, target in zip(proposals, targets, strict=True):
            gt = target["boxes"].to(boxes)
            gt_labels = target["labels"].to(device=boxes.device, dtype=torch.int64)
            boxes = torch.cat([boxes, gt])  # (P + G, 4)
            if gt.numel() == 0:
                labels = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
                matched = torch.zeros_like(boxes)
            else:
                best_iou, best_gt = box_iou(gt, boxes).max(dim=0)  # (P + G,)
                labels = gt_labels[best_gt]
                labels[best_iou < self.bg_iou] = 0
                labels[(best_iou >= self.bg_iou) & (best_iou < self.fg_iou)] = -1  # ignored
                matched = gt[best_gt]
            positive, negative = sample_labels(labels, self.batch_per_image, self.positive_fraction)
            keep = torch.cat([positive, negative])
            labels = labels[keep]
            regression = torch.zeros((keep.numel(), 4), dtype=torch.float32, device=boxes.device)
            if positive.numel() > 0:
                regression[: positive.numel()] = encode_boxes(
                    matched[positive], boxes[positive], self.box_reg_weights
                )
            sampled_boxes.append(boxes[keep])
            all_labels.append(labels)
            all_targets.append(regression)
        return sampled_boxes, torch.cat(all_labels), torch.cat(all_targets)

    def losses(
        self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor
    ) -> dict[str, Tensor]:
        """Cross-entropy over all sampled RoIs; smooth L1 on the GT class's deltas of the
        foreground RoIs, divided by the number of sampled RoIs."""
        loss_cls = F.cross_entropy(class_logits.float(), labels)
        fg = torch.nonzero(labels > 0).squeeze(1)
        deltas = box_deltas.view(box_deltas.shape[0], -1, 4)[fg, labels[fg]].float()  # (F, 4)
        loss_box = F.smooth_l1_loss(deltas, regression_targets[fg], beta=SMOOTH_L1_BETA, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box": loss_box / max(labels.numel(), 1)}

    @torch.no_grad()
    def predict_boxes(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Softmax, score threshold, class-specific decoding, clipping, per-class NMS, top-N.

        Only the (RoI, class) pairs above the score threshold are decoded: Q of them.
        """
        num_rois = class_logits.shape[0]
        scores_all = F.softmax(class_logits.float(), dim=-1)  # (R, K+1)
        roi, cls = torch.nonzero(scores_all[:, 1:] > self.score_thresh, as_tuple=True)  # (Q,), (Q,)
        cls = cls + 1  # column 0 is the background
        deltas = box_deltas.view(num_rois, -1, 4)[roi, cls].float()  # (Q, 4)
        boxes_all = decode_boxes(deltas, torch.cat(proposals)[roi], self.box_reg_weights)[:, 0]  # (Q, 4)
        scores_all = scores_all[roi, cls]  # (Q,)
        image_of_roi = torch.repeat_interleave(
            torch.arange(len(proposals), device=roi.device),
            torch.tensor([p.shape[0] for p in proposals], device=roi.device),
        )  # (R,)
        image_of_pair = image_of_roi[roi]  # (Q,)
        results = []
        for i, size in enumerate(image_sizes):
            mine = image_of_pair == i
            boxes = clip_boxes(boxes_all[mine], size)
            scores, labels = scores_all[mine], cls[mine]
            keep = nonempty_mask(boxes, MIN_DETECTION_SIZE)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[: self.detections_per_image]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
