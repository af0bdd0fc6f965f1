"""The FPN detector (Fig. 3 + Sec. 4 of the FPN paper) and `build_detector`.

Faster R-CNN with a feature pyramid: the image batch goes through the bottom-up pathway
(ResNet C2..C5), the top-down pathway with lateral connections (P2..P6), the RPN on every
level, and the Fast R-CNN head pooling each RoI from the level of Eq. (1).

Inputs: ``images``: list of N tensors (3, H_i, W_i), float RGB in 0..1, any sizes;
``targets`` (training): list of N dicts with ``boxes`` (G_i, 4) float ``[x1, y1, x2, y2]`` in
absolute input pixels and ``labels`` (G_i,) int64 in 1..num_classes (0 is background).
G_i = 0 is allowed.
Outputs: training: ``{"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}`` (float32
scalars); eval: one dict per image with ``boxes`` (D, 4) in input pixels, ``scores`` (D,),
``labels`` (D,) int64, ``proposals`` (P, 4) in input pixels and ``proposal_scores`` (P,).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fpn.anchors import AnchorGenerator, anchor_sizes_per_level
from fpn.backbone import ResNetBackbone
from fpn.config import ROI_LEVELS, RPN_LEVELS, ModelConfig
from fpn.neck import FeaturePyramid, SingleScale
from fpn.poolers import MultiLevelRoIAlign
from fpn.roi_heads import BoxPredictor, RoIHeads, TwoMLPHead
from fpn.rpn import RPN, RPNHead
from fpn.transform import Transform


class Detector(nn.Module):
    """transform -> backbone (bottom-up) -> neck (top-down + lateral) -> rpn -> roi_heads."""

    def __init__(
        self,
        *,
        transform: Transform,
        backbone: nn.Module,
        neck: nn.Module,
        rpn: RPN,
        roi_heads: RoIHeads,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        if channels_last:
            # Conv weights in NHWC too, else each convolution converts its weight (and the
            # weight's gradient) on every call. After the submodules are assigned: `.to()` on a
            # module without them converts nothing. `load_state_dict` copies into these tensors,
            # so loaded weights keep the layout.
            self.to(memory_format=torch.channels_last)

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise ValueError("Detector: targets are needed in training mode")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"Detector: {len(images)} images but {len(targets)} targets")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, targets = self.transform(images, targets)
        x = batch.tensor  # (N, 3, H, W)
        if self.channels_last:
            # NHWC runs the convolutions faster on CPU (oneDNN) and on GPU tensor cores.
            x = x.contiguous(memory_format=torch.channels_last)
        bottom_up = self.backbone(x)  # {k: C_k}
        pyramid = self.neck(bottom_up)  # {k: P_k}
        proposals, proposal_scores, rpn_losses = self.rpn(
            pyramid, batch.image_sizes, tuple(batch.tensor.shape[-2:]), targets
        )
        detections, head_losses = self.roi_heads(pyramid, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}
        for det, props, scores in zip(detections, proposals, proposal_scores, strict=True):
            det["proposals"] = props
            det["proposal_scores"] = scores
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def pyramid_levels(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(RPN levels, RoI-head levels) of ``cfg.pyramid``."""
    return RPN_LEVELS[cfg.pyramid], ROI_LEVELS[cfg.pyramid]


def build_detector(cfg: ModelConfig) -> Detector:
    """The detector described by ``cfg`` (randomly initialised; see `load_torchvision_weights`)."""
    rpn_levels, roi_levels = pyramid_levels(cfg)
    d = cfg.fpn_channels
    backbone = ResNetBackbone(
        depth_name=cfg.backbone,
        norm=cfg.norm,
        trainable_stages=cfg.trainable_stages,
        last_level=4 if cfg.pyramid == "single_c4" else 5,
        fold_frozen_bn=cfg.fold_frozen_bn,
    )
    if cfg.pyramid in ("single_c4", "single_c5"):
        level = rpn_levels[0]
        neck: nn.Module = SingleScale(in_channels=backbone.out_channels[level], out_channels=d, level=level)
    else:
        neck = FeaturePyramid(
            in_channels=backbone.out_channels,
            out_channels=d,
            top_down=cfg.pyramid != "bottom_up",
            lateral=cfg.pyramid != "top_down_no_lateral",
            output_levels=rpn_levels,
        )
    anchor_generator = AnchorGenerator(
        sizes_per_level=anchor_sizes_per_level(rpn_levels, cfg.anchor_sizes), aspect_ratios=cfg.aspect_ratios
    )
    rpn = RPN(
        head=RPNHead(
            in_channels=d, num_anchors=anchor_generator.num_anchors_per_location(), shared=cfg.shared_rpn_head
        ),
        anchor_generator=anchor_generator,
        fg_iou=cfg.rpn_fg_iou,
        bg_iou=cfg.rpn_bg_iou,
        batch_per_image=cfg.rpn_batch_per_image,
        positive_fraction=cfg.rpn_positive_fraction,
        pre_nms_topk=(cfg.rpn_pre_nms_topk_train, cfg.rpn_pre_nms_topk_test),
        post_nms_topk=(cfg.rpn_post_nms_topk_train, cfg.rpn_post_nms_topk_test),
        nms_iou=cfg.rpn_nms_iou,
        score_thresh=cfg.rpn_score_thresh,
    )
    roi_heads = RoIHeads(
        pooler=MultiLevelRoIAlign(
            levels=roi_levels,
            output_size=cfg.roi_output_size,
            sampling_ratio=cfg.roi_sampling_ratio,
            canonical_level=cfg.canonical_level,
            canonical_scale=cfg.canonical_scale,
        ),
        box_head=TwoMLPHead(
            in_features=d * cfg.roi_output_size**2, representation_size=cfg.representation_size
        ),
        predictor=BoxPredictor(in_features=cfg.representation_size, num_classes=cfg.num_classes),
        fg_iou=cfg.roi_fg_iou,
        bg_iou=cfg.roi_bg_iou,
        batch_per_image=cfg.roi_batch_per_image,
        positive_fraction=cfg.roi_positive_fraction,
        box_reg_weights=cfg.box_reg_weights,
        score_thresh=cfg.box_score_thresh,
        nms_iou=cfg.box_nms_iou,
        detections_per_image=cfg.detections_per_image,
    )
    transform = Transform(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        size_divisible=cfg.size_divisible,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
    )
    return Detector(
        transform=transform,
        backbone=backbone,
        neck=neck,
        rpn=rpn,
        roi_heads=roi_heads,
        channels_last=cfg.channels_last,
    )
