"""The detectors a user would pick instead of ours, built to do the same work as ours.

* `torchvision_reference(cfg)`: torchvision's FasterRCNN with a ResNet-FPN backbone, every
  setting taken from ``cfg`` (sizes, anchors, RPN and RoI-head settings, FPN width ``d``,
  fc width). For ResNet-50, d=256 and the paper's head this is exactly
  ``fasterrcnn_resnet50_fpn`` as built for COCO weights (frozen BatchNorm, 3 trainable
  stages), with random weights (nothing is downloaded).
* `reference_config(cfg)`: the nearest config of ours that torchvision can express
  (pyramid "fpn", a shared RPN head, ...) and what had to change.
* `reference_pair(cfg)`: ours and torchvision's with the same random weights, loaded into
  ours by `fpn.load_torchvision_weights`, so both compute the same detections.
* `detections_at_threshold`: both models' detections at a score threshold of 0, to check
  that they are the same (random weights score every class about equally, under 0.05).
* `single_scale_baseline(cfg)`: ours with ``pyramid="single_c4"`` and otherwise the same
  settings, the paper's single-scale baseline beside FPN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fpn import ModelConfig, build_detector, load_torchvision_weights

# What torchvision's FasterRCNN + resnet_fpn_backbone can express of a ModelConfig.
_FIXED = {"pyramid": "fpn", "shared_rpn_head": True}
_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": lambda channels: nn.GroupNorm(32, channels),  # as fpn.backbone's "gn"
}


class ReferenceError(ValueError):
    """A config torchvision's detector cannot be built for; the message names the key."""


def reference_config(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """The nearest config to ``cfg`` that torchvision's FasterRCNN can express.

    Returns the config and the changes made, e.g. ``["pyramid: single_c4 -> fpn"]``.
    torchvision's detector has the full FPN on P2..P6 (five anchor sizes) and one RPN head
    shared by all levels; the body may use frozen BN, BN or GroupNorm(32) like ours.
    """
    changes: dict[str, object] = dict(_FIXED)
    if cfg.norm not in _NORMS:
        changes["norm"] = "frozen_bn"
    if len(cfg.anchor_sizes) != 5:
        changes["anchor_sizes"] = ModelConfig().anchor_sizes
    notes = [
        f"{key}: {getattr(cfg, key)} -> {value}"
        for key, value in changes.items()
        if getattr(cfg, key) != value
    ]
    return dataclasses.replace(cfg, **changes), notes


def _backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """ResNet body + FPN (P2..P5 by 3x3 convs, P6 by max-pool), torchvision's modules."""
    norm_layer = _NORMS[cfg.norm]
    if cfg.fpn_channels == 256:
        return resnet_fpn_backbone(
            backbone_name=cfg.backbone,
            weights=None,
            norm_layer=norm_layer,
            trainable_layers=cfg.trainable_stages,
        )
    # Same as resnet_fpn_backbone, which fixes the FPN width at 256.
    body = getattr(resnet, cfg.backbone)(weights=None, norm_layer=norm_layer)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_stages]
    if cfg.trainable_stages == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable):
            parameter.requires_grad_(False)
    width = body.inplanes // 8  # channels of C2
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
        in_channels_list=[width * 2 ** (k - 1) for k in (1, 2, 3, 4)],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def torchvision_reference(cfg: ModelConfig) -> FasterRCNN:
    """torchvision's FasterRCNN (random weights, train mode) doing the work ``cfg`` describes.

    ``cfg`` must be expressible (see `reference_config`); otherwise `ReferenceError` names
    the key.
    """
    _, notes = reference_config(cfg)
    if notes:
        raise ReferenceError(f"model config not expressible in torchvision: {'; '.join(notes)}")
    levels = ["0", "1", "2", "3"]
    backbone = _backbone(cfg)
    resolution = cfg.roi_output_size
    return FasterRCNN(
        backbone,
        num_classes=None,  # given by box_predictor
        min_size=cfg.min_size,  # an int or a tuple: torchvision's convention is ours (test at the last)
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        size_divisible=cfg.size_divisible,
        rpn_anchor_generator=AnchorGenerator(
            sizes=tuple((size,) for size in cfg.anchor_sizes),
            aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes),
        ),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_topk_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_topk_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_topk_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_topk_test,
        rpn_nms_thresh=cfg.rpn_nms_iou,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        rpn_score_thresh=cfg.rpn_score_thresh,
        box_roi_pool=MultiScaleRoIAlign(
            featmap_names=levels,
            output_size=resolution,
            sampling_ratio=cfg.roi_sampling_ratio,
            canonical_scale=cfg.canonical_scale,
            canonical_level=cfg.canonical_level,
        ),
        box_head=TwoMLPHead(cfg.fpn_channels * resolution**2, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes + 1),
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_iou,
        box_detections_per_img=cfg.detections_per_image,
        box_fg_iou_thresh=cfg.roi_fg_iou,
        box_bg_iou_thresh=cfg.roi_bg_iou,
        box_batch_size_per_image=cfg.roi_batch_per_image,
        box_positive_fraction=cfg.roi_positive_fraction,
        bbox_reg_weights=tuple(cfg.box_reg_weights),
    )


def reference_pair(cfg: ModelConfig, *, seed: int = 0) -> tuple[nn.Module, FasterRCNN, list[str]]:
    """Ours and torchvision's detector with the same random weights, for `reference_config(cfg)`.

    Returns (ours, theirs, changes): both in eval mode on the CPU; ``changes`` lists what
    `reference_config` changed in ``cfg``.
    """
    ref_cfg, notes = reference_config(cfg)
    torch.manual_seed(seed)
    theirs = torchvision_reference(ref_cfg).eval()
    ours = build_detector(ref_cfg)
    load_torchvision_weights(ours, theirs.state_dict())
    _match_trainable(ours, theirs)
    return ours.eval(), theirs, notes


def _match_trainable(ours: nn.Module, theirs: nn.Module) -> None:
    """Check both train the same number of parameters (else a training step is unfair)."""
    count = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, model in (("ours", ours), ("torchvision", theirs))
    }
    if count["ours"] != count["torchvision"]:
        raise ReferenceError(f"trainable parameters differ: {count}")


def detections_at_threshold(
    models: Sequence[nn.Module], images: list[Tensor], score_thresh: float = 0.0
) -> list[list[dict[str, Tensor]]]:
    """Eval-mode outputs of each model (ours or torchvision's) with the RoI heads' score
    threshold set to ``score_thresh`` for the call, then restored.

    With random weights the class scores are near uniform (about 1 / (K + 1)), under the
    default 0.05: at 0 every image has ``detections_per_image`` detections to compare.
    """
    outputs = []
    for model in models:
        heads = model.roi_heads
        saved, heads.score_thresh = heads.score_thresh, score_thresh
        try:
            with torch.inference_mode():
                outputs.append(model.eval()(images))
        finally:
            heads.score_thresh = saved
    return outputs


def single_scale_baseline(cfg: ModelConfig, *, seed: int = 0) -> nn.Module:
    """Ours with the single-scale C4 pyramid and ``cfg``'s other settings, random weights, eval mode."""
    torch.manual_seed(seed)
    return build_detector(dataclasses.replace(cfg, pyramid="single_c4")).eval()
