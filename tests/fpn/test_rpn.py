"""RPN: head shapes, anchor labelling and sampling, losses, proposals."""

from __future__ import annotations

import pytest
import torch

from fpn.anchors import AnchorGenerator, anchor_sizes_per_level
from fpn.rpn import RPN, RPNHead, sample_labels

LEVELS = (2, 3, 4, 5, 6)


def make_rpn(*, shared: bool = True, batch: int = 256, post: int = 100) -> RPN:
    generator = AnchorGenerator(
        sizes_per_level=anchor_sizes_per_level(LEVELS, (16, 32, 64, 128, 256)), aspect_ratios=(0.5, 1.0, 2.0)
    )
    return RPN(
        head=RPNHead(in_channels=8, num_anchors=generator.num_anchors_per_location(), shared=shared),
        anchor_generator=generator,
        fg_iou=0.7,
        bg_iou=0.3,
        batch_per_image=batch,
        positive_fraction=0.5,
        pre_nms_topk=(200, 100),
        post_nms_topk=(150, post),
        nms_iou=0.7,
        score_thresh=0.0,
    )


def pyramid(n: int = 2, size: int = 128) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, 8, -(-size // 2**k), -(-size // 2**k), generator=g) for k in LEVELS}


@pytest.mark.parametrize("shared", [True, False])
def test_head_shapes(shared: bool) -> None:
    torch.manual_seed(0)
    head = RPNHead(in_channels=8, num_anchors=dict.fromkeys(LEVELS, 3), shared=shared)
    feats = list(pyramid().values())
    logits, deltas = head(feats)
    for f, lg, dl in zip(feats, logits, deltas, strict=True):
        assert lg.shape == (2, 3, *f.shape[-2:]) and dl.shape == (2, 12, *f.shape[-2:])
    n_params = sum(p.numel() for p in head.parameters())
    one_head = 8 * 8 * 9 + 8 + 8 * 3 + 3 + 8 * 12 + 12
    assert n_params == (one_head if shared else 5 * one_head)


def test_shared_head_needs_equal_anchor_counts() -> None:
    with pytest.raises(ValueError, match="same anchors per location"):
        RPNHead(in_channels=8, num_anchors={2: 3, 3: 15}, shared=True)


def test_labelling_rules() -> None:
    rpn = make_rpn(batch=1000)
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with GT 0 -> positive
            [0.0, 0.0, 10.0, 9.0],  # IoU 0.9 -> positive
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> ignored
            [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> negative
            [100.0, 100.0, 120.0, 140.0],  # IoU 0.5 with GT 1, its best anchor -> positive
        ]
    )
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 120.0, 120.0]])}]
    labels, matched = rpn.label_and_sample_anchors(anchors, targets)
    assert labels.tolist() == [[1.0, 1.0, -1.0, 0.0, 1.0]]
    torch.testing.assert_close(matched[0, 4], targets[0]["boxes"][1])


def test_sampling_budget_and_fraction() -> None:
    labels = torch.tensor([1] * 300 + [0] * 1000 + [-1] * 50)
    pos, neg = sample_labels(labels, 256, 0.5)
    assert pos.numel() == 128 and neg.numel() == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    pos, neg = sample_labels(torch.tensor([1] * 3 + [0] * 1000), 256, 0.5)
    assert pos.numel() == 3 and neg.numel() == 253


def test_empty_targets_train() -> None:
    torch.manual_seed(0)
    rpn = make_rpn().train()
    targets = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    proposals, scores, losses = rpn(pyramid(), [(128, 128), (100, 120)], (128, 128), targets)
    assert losses["loss_rpn_box"].item() == 0.0
    assert losses["loss_rpn_cls"].item() > 0
    labels, _ = rpn.label_and_sample_anchors(
        torch.cat(
            list(
                rpn.anchor_generator(
                    {k: tuple(v.shape[-2:]) for k, v in pyramid().items()},
                    (128, 128),
                    torch.device("cpu"),
                    torch.float32,
                ).values()
            )
        ),
        targets,
    )
    assert ((labels == 0).sum(dim=1) == 256).all() and not (labels == 1).any()
    sum(losses.values()).backward()
    assert rpn.head.cls_logits.weight.grad is not None


def test_losses_with_boxes_and_gradients() -> None:
    torch.manual_seed(0)
    rpn = make_rpn().train()
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])},
        {"boxes": torch.tensor([[0.0, 0.0, 100.0, 90.0]])},
    ]
    _, _, losses = rpn(pyramid(), [(128, 128), (128, 128)], (128, 128), targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert losses["loss_rpn_box"].item() > 0
    sum(losses.values()).backward()
    assert rpn.head.bbox_pred.weight.grad.abs().sum() > 0


def test_proposals_inside_image_sorted_and_capped() -> None:
    torch.manual_seed(0)
    rpn = make_rpn(post=60).eval()
    sizes = [(128, 128), (90, 110)]
    with torch.no_grad():
        proposals, scores, losses = rpn(pyramid(), sizes, (128, 128))
    assert losses == {}
    for boxes, s, (h, w) in zip(proposals, scores, sizes, strict=True):
        assert 0 < boxes.shape[0] <= 60 and s.shape == (boxes.shape[0],)
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert (s[:-1] >= s[1:]).all() and ((s >= 0) & (s <= 1)).all()
