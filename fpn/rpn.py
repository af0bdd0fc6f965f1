"""Region Proposal Network on the feature pyramid (Sec. 4.1 of the FPN paper).

"We attach a head of the same design (3x3 conv and two sibling 1x1 convs) to each level on
our feature pyramid ... The parameters of the heads are shared across all feature pyramid
levels" (Sec. 4.1). Training labels follow Faster R-CNN: an anchor is positive if its IoU
with some ground-truth box is > 0.7 or it is the best anchor for a ground-truth box, and
negative if its IoU is < 0.3 for all of them; 256 anchors per image are sampled at up to
50% positives.

Shape shorthand:
    N: images in the minibatch, L: pyramid levels used by the RPN (P2..P6 for FPN),
    A: anchors per location of a level, H_l x W_l: grid of level l,
    M: anchors of one image over all levels = sum_l H_l * W_l * A,
    G: ground-truth boxes of one image, K: proposals kept for an image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from fpn.anchors import AnchorGenerator
from fpn.boxes import RPN_WEIGHTS, clip_boxes, decode_boxes, encode_boxes, nonempty_mask

# Proposals narrower or lower than this many pixels (input of the network) are dropped.
MIN_PROPOSAL_SIZE = 1e-3
# Smooth-L1 transition point of the box losses (beta = 1/sigma^2 with sigma = 3).
SMOOTH_L1_BETA = 1.0 / 9.0


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 convs for objectness (A) and box deltas (4A).

    ``shared=True`` (the paper): one head for every level (all levels must have the same A).
    ``shared=False``: one head per level (the ``shared_rpn_head`` ablation).
    Per level: in (N, d, H, W) -> logits (N, A, H, W), deltas (N, 4A, H, W) laid out as
    (A, 4) along the channel axis.
    """

    def __init__(self, *, in_channels: int, num_anchors: dict[int, int], shared: bool = True) -> None:
        super().__init__()
        self.levels = tuple(sorted(num_anchors))
        self.shared = shared
        if shared:
            counts = set(num_anchors.values())
            if len(counts) != 1:
                raise ValueError(
                    f"a shared RPN head needs the same anchors per location at every level, got {num_anchors}"
                )
            a = counts.pop()
            self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
            self.cls_logits = nn.Conv2d(in_channels, a, 1)
            self.bbox_pred = nn.Conv2d(in_channels, 4 * a, 1)
        else:
            keys = [str(k) for k in self.levels]
            self.conv = nn.ModuleDict({k: nn.Conv2d(in_channels, in_channels, 3, padding=1) for k in keys})
            self.cls_logits = nn.ModuleDict(
                {str(k): nn.Conv2d(in_channels, num_anchors[k], 1) for k in self.levels}
            )
            self.bbox_pred = nn.ModuleDict(
                {str(k): nn.Conv2d(in_channels, 4 * num_anchors[k], 1) for k in self.levels}
            )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for level, x in zip(self.levels, features, strict=True):
            if self.shared:
                conv, cls, box = self.conv, self.cls_logits, self.bbox_pred
            else:
                key = str(level)
                conv, cls, box = self.conv[key], self.cls_logits[key], self.bbox_pred[key]
            t = F.relu(conv(x))
            logits.append(cls(t))
            deltas.append(box(t))
        return logits, deltas


def sample_labels(labels: Tensor, batch_size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Sample positives (label > 0) and negatives (label == 0) of one image.

    labels: (M,) with -1 = ignore -> (positive indices, negative indices); at most
    ``batch_size * positive_fraction`` positives, negatives fill the rest of ``batch_size``.
    """
    positive = torch.nonzero(labels > 0).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    negative = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return positive, negative


class RPN(nn.Module):
    """Proposals from the pyramid, and the RPN losses in training.

    Args:
        head: an `RPNHead`.
        anchor_generator: an `AnchorGenerator` over the same levels as ``head``.
        fg_iou, bg_iou: anchor labelling thresholds (0.7, 0.3).
        batch_per_image, positive_fraction: anchor sampling (256, 0.5).
        pre_nms_topk, post_nms_topk: ``(train, test)`` pairs; ``pre`` is per level, ``post``
            per image (torchvision's convention).
        nms_iou: NMS threshold over the proposals of one image, levels kept apart.
        score_thresh: minimum objectness probability of a proposal.
    """

    def __init__(
        self,
        *,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        fg_iou: float,
        bg_iou: float,
        batch_per_image: int,
        positive_fraction: float,
        pre_nms_topk: tuple[int, int],
        post_nms_topk: tuple[int, int],
        nms_iou: float,
        score_thresh: float,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.levels = anchor_generator.levels
        self.fg_iou = fg_iou
        self.bg_iou = bg_iou
        self.batch_per_image = batch_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_iou = nms_iou
        self.score_thresh = score_thresh

    def forward(
        self,
        features: dict[int, Tensor],
        image_sizes: list[tuple[int, int]],
        batch_size_hw: tuple[int, int],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Returns per image proposals (K, 4) and their objectness probabilities (K,) in the
        resized-image frame, and the losses (empty outside training)."""
        maps = [features[k] for k in self.levels]
        logits, deltas = self.head(maps)
        n = maps[0].shape[0]
        grids = {k: tuple(x.shape[-2:]) for k, x in zip(self.levels, maps, strict=True)}
        anchors = self.anchor_generator(grids, batch_size_hw, maps[0].device, torch.float32)
        anchors = [anchors[k] for k in self.levels]  # L x (H_l*W_l*A, 4)
        logits = [x.permute(0, 2, 3, 1).reshape(n, -1) for x in logits]  # L x (N, H_l*W_l*A)
        deltas = [
            d.view(n, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            for d in deltas
        ]  # L x (N, H_l*W_l*A, 4)
        proposals, scores = self.predict_proposals(logits, deltas, anchors, image_sizes)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN: targets are needed in training mode")
            all_anchors = torch.cat(anchors)  # (M, 4)
            labels, matched = self.label_and_sample_anchors(all_anchors, targets)
            losses = self.losses(torch.cat(logits, 1), torch.cat(deltas, 1), all_anchors, labels, matched)
        return proposals, scores, losses

    @torch.no_grad()
    def predict_proposals(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Top-k anchors per level by objectness, decoded, clipped, NMS per image and level.

        Only the top-k anchors of each level are decoded (the rest could not survive).
        """
        pre_topk = self.pre_nms_topk[0 if self.training else 1]
        post_topk = self.post_nms_topk[0 if self.training else 1]
        n = logits[0].shape[0]
        level_boxes, level_scores, level_ids = [], [], []
        for i, (lg, dl, an) in enumerate(zip(logits, deltas, anchors, strict=True)):
            k = min(pre_topk, lg.shape[1])
            top_logits, top_idx = lg.detach().topk(k, dim=1)  # (N, k)
            top_deltas = torch.gather(dl.detach(), 1, top_idx[..., None].expand(n, k, 4))  # (N, k, 4)
            # Decoded in float32 whatever the features' dtype (AMP): coordinates reach ~1e3 px.
            boxes = decode_boxes(
                top_deltas.reshape(-1, 4).float(), an[top_idx.reshape(-1)], RPN_WEIGHTS
            )  # (N*k, 1, 4)
            level_boxes.append(boxes.view(n, k, 4))
            level_scores.append(top_logits)
            level_ids.append(torch.full((k,), i, dtype=torch.int64, device=lg.device))
        boxes_all = torch.cat(level_boxes, 1)  # (N, sum_l k_l, 4)
        probs_all = torch.cat(level_scores, 1).float().sigmoid()  # (N, sum_l k_l)
        ids_all = torch.cat(level_ids)  # (sum_l k_l,)
        proposals, scores = [], []
        for boxes, probs, size in zip(boxes_all, probs_all, image_sizes, strict=True):
            boxes = clip_boxes(boxes, size)
            keep = nonempty_mask(boxes, MIN_PROPOSAL_SIZE) & (probs >= self.score_thresh)
            boxes, probs, ids = boxes[keep], probs[keep], ids_all[keep]
            keep = batched_nms(boxes, probs, ids, self.nms_iou)[:post_topk]
            proposals.append(boxes[keep])
            scores.append(probs[keep])
        return proposals, scores

    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """Label the M anchors of each image and sample ``batch_per_image`` of them.

        Returns labels (N, M) float: 1 = sampled positive, 0 = sampled negative, -1 = not
        sampled; and the matched ground-truth box of every anchor (N, M, 4) (zeros without GT).
        """
        all_labels, all_matched = [], []
        for target in targets:
            gt = target["boxes"].to(anchors)
            labels = torch.full((anchors.shape[0],), -1.0, device=anchors.device)
            if gt.numel() == 0:
                labels.fill_(0.0)  # no objects: every anchor is background
                matched = torch.zeros_like(anchors)
            else:
                iou = box_iou(gt, anchors)  # (G, M)
                best_iou, best_gt = iou.max(dim=0)  # (M,)
                labels[best_iou < self.bg_iou] = 0.0
                labels[best_iou >= self.fg_iou] = 1.0
                # Also positive: for each GT box the anchor(s) with the highest IoU (ties kept).
                best_per_gt = iou.max(dim=1, keepdim=True).values  # (G, 1)
                is_best = (iou == best_per_gt) & (best_per_gt > 0)
                labels[is_best.any(dim=0)] = 1.0
                matched = gt[best_gt]  # (M, 4)
            positive, negative = sample_labels(labels, self.batch_per_image, self.positive_fraction)
            sampled = torch.full_like(labels, -1.0)
            sampled[positive] = 1.0
            sampled[negative] = 0.0
            all_labels.append(sampled)
            all_matched.append(matched)
        return torch.stack(all_labels), torch.stack(all_matched)

    def losses(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, labels: Tensor, matched: Tensor
    ) -> dict[str, Tensor]:
        """Binary cross-entropy over sampled anchors; smooth L1 over positives, both divided by
        the number of sampled anchors. logits (N, M), deltas (N, M, 4), labels (N, M)."""
        sampled = labels >= 0
        positive = labels > 0
        num_sampled = max(int(sampled.sum()), 1)
        loss_cls = F.binary_cross_entropy_with_logits(
            logits[sampled].float(), labels[sampled], reduction="sum"
        )
        pos_img, pos_anchor = torch.nonzero(positive, as_tuple=True)
        targets = encode_boxes(matched[pos_img, pos_anchor], anchors[pos_anchor], RPN_WEIGHTS)  # (P, 4)
        loss_box = F.smooth_l1_loss(
            deltas[pos_img, pos_anchor].float(), targets, beta=SMOOTH_L1_BETA, reduction="sum"
        )
        return {"loss_rpn_cls": loss_cls / num_sampled, "loss_rpn_box": loss_box / num_sampled}
