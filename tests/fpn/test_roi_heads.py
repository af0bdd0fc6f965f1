"""Fast R-CNN head: sampling, losses, post-processing on hand-made logits."""

from __future__ import annotations

import torch

from fpn.boxes import encode_boxes
from fpn.poolers import MultiLevelRoIAlign
from fpn.roi_heads import BoxPredictor, RoIHeads, TwoMLPHead

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def make_heads(*, batch: int = 16, score_thresh: float = 0.05, detections: int = 100) -> RoIHeads:
    return RoIHeads(
        pooler=MultiLevelRoIAlign(levels=(2, 3, 4, 5), output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(in_features=8 * 49, representation_size=32),
        predictor=BoxPredictor(in_features=32, num_classes=3),
        fg_iou=0.5,
        bg_iou=0.5,
        batch_per_image=batch,
        positive_fraction=0.25,
        box_reg_weights=WEIGHTS,
        score_thresh=score_thresh,
        nms_iou=0.5,
        detections_per_image=detections,
    )


def pyramid() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(1, 8, 128 // 2**k, 128 // 2**k, generator=g) for k in (2, 3, 4, 5)}


def test_head_shapes() -> None:
    x = TwoMLPHead(in_features=8 * 49, representation_size=32)(torch.randn(5, 8, 7, 7))
    assert x.shape == (5, 32) and (x >= 0).all()
    logits, deltas = BoxPredictor(in_features=32, num_classes=3)(x)
    assert logits.shape == (5, 4) and deltas.shape == (5, 16)


def test_sampling_adds_gt_and_respects_fraction() -> None:
    torch.manual_seed(0)
    heads = make_heads(batch=16)
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    near = gt + torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # IoU > 0.5
    far = torch.tensor([[80.0, 80.0, 100.0, 100.0]]).repeat(30, 1)
    proposals = [torch.cat([near.repeat(10, 1), far])]
    boxes, labels, targets = heads.label_and_sample_proposals(
        proposals, [{"boxes": gt, "labels": torch.tensor([2])}]
    )
    assert boxes[0].shape == (16, 4) and labels.shape == (16,) and targets.shape == (16, 4)
    assert (labels == 2).sum() == 4 and (labels == 0).sum() == 12  # 25% of 16 foreground
    fg = labels > 0
    torch.testing.assert_close(targets[fg], encode_boxes(gt.expand(4, 4), boxes[0][fg], WEIGHTS))
    assert (targets[~fg] == 0).all()


def test_empty_targets_all_background_zero_box_loss() -> None:
    torch.manual_seed(0)
    heads = make_heads().train()
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 90.0, 100.0]])]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    detections, losses = heads(pyramid(), proposals, [(128, 128)], empty)
    assert detections == [] and losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()


def test_box_loss_uses_the_gt_class_column() -> None:
    heads = make_heads()
    logits = torch.zeros(2, 4)
    deltas = torch.zeros(2, 16)
    deltas[0, 8:12] = 1.0  # class 2 column of RoI 0
    labels = torch.tensor([2, 0])
    targets = torch.zeros(2, 4)
    losses = heads.losses(logits, deltas, labels, targets)
    beta = 1.0 / 9.0
    expected = 4 * (1.0 - 0.5 * beta) / 2  # smooth L1 of 4 unit errors, over 2 sampled RoIs
    torch.testing.assert_close(losses["loss_box"], torch.tensor(expected))
    deltas[0, 8:12] = 0.0
    deltas[0, 4:8] = 1.0  # another class's column: no loss
    assert heads.losses(logits, deltas, labels, targets)["loss_box"].item() == 0.0


def test_predict_boxes_threshold_nms_and_cap() -> None:
    heads = make_heads(score_thresh=0.3, detections=2)
    proposals = [
        torch.tensor([[10.0, 10.0, 50.0, 50.0], [11.0, 11.0, 51.0, 51.0], [60.0, 60.0, 90.0, 100.0]])
    ]
    logits = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 6.0]])
    deltas = torch.zeros(3, 16)
    (result,) = heads.predict_boxes(logits, deltas, proposals, [(128, 128)])
    # RoI 1 is suppressed by RoI 0 (same class, IoU > 0.5); sorted by score; others below 0.3.
    assert result["labels"].tolist() == [3, 2]
    torch.testing.assert_close(result["boxes"], proposals[0][[2, 0]])
    assert (result["scores"] > 0.3).all() and result["scores"][0] >= result["scores"][1]
    (capped,) = make_heads(score_thresh=0.0, detections=2).predict_boxes(
        logits, deltas, proposals, [(128, 128)]
    )
    assert capped["boxes"].shape == (2, 4)


def test_predicted_boxes_are_clipped() -> None:
    heads = make_heads(score_thresh=0.0)
    proposals = [torch.tensor([[100.0, 100.0, 127.0, 127.0]])]
    deltas = torch.zeros(1, 16)
    deltas[0, 4:8] = torch.tensor([5.0, 5.0, 0.0, 0.0])  # class 1 shifted half a box width
    (result,) = heads.predict_boxes(torch.zeros(1, 4), deltas, proposals, [(120, 125)])
    boxes = result["boxes"][result["labels"] == 1]
    torch.testing.assert_close(boxes, torch.tensor([[113.5, 113.5, 125.0, 120.0]]))
