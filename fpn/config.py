"""Typed configuration of the FPN detector.

`ModelConfig` is a frozen dataclass holding every architectural and test-time setting of
the detector of "Feature Pyramid Networks for Object Detection" (Lin et al., CVPR 2017).
Conventions:

* ``num_classes`` counts foreground classes only. Labels are ``1..num_classes``; label 0
  is the background (torchvision's convention, so ``fasterrcnn_resnet50_fpn``'s 91 outputs
  are ``num_classes=90``).
* Pyramid levels are named by their index ``k`` (stride ``2**k``): P2..P6 for FPN.
* ``anchor_sizes`` gives one anchor side (sqrt of area, in input pixels) per pyramid level
  used by the RPN, finest first; ``aspect_ratios`` are height/width ratios.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("frozen_bn", "bn", "gn")
# Ablations of the paper (Tables 1-3):
#   fpn                  top-down pathway + lateral connections, P2..P6 (the paper's model)
#   bottom_up            no top-down pathway: 1x1 + 3x3 convs on C2..C5 (a bottom-up pyramid)
#   top_down_no_lateral  top-down pathway without the 1x1 lateral connections
#   p2_only              FPN features, but RPN and RoI head use only the finest level P2
#   single_c4, single_c5 single-scale baseline: RPN and RoI head on one map (C4 or C5)
PYRAMIDS = ("fpn", "bottom_up", "top_down_no_lateral", "p2_only", "single_c4", "single_c5")


@dataclass(frozen=True)
class ModelConfig:
    """Every setting of the detector. Defaults are the paper's ResNet-50-FPN on COCO."""

    # Bottom-up pathway (ResNet body).
    backbone: str = "resnet50"
    norm: str = "frozen_bn"
    trainable_stages: int = 3  # 0..5: how many of (stem, res2, res3, res4, res5) train, from the top
    # Top-down pathway and lateral connections.
    pyramid: str = "fpn"
    fpn_channels: int = 256  # d in the paper
    # Input handling (inside the model): resize, normalise, pad to a multiple of size_divisible.
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Anchors and RPN.
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    shared_rpn_head: bool = True
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 2000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_iou: float = 0.7
    rpn_score_thresh: float = 0.0
    # Fast R-CNN head on the pyramid.
    num_classes: int = 80
    canonical_level: int = 4  # k0 of Eq. (1)
    canonical_scale: int = 224
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    representation_size: int = 1024  # width of the two hidden fc layers
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    roi_batch_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_score_thresh: float = 0.05
    box_nms_iou: float = 0.5
    detections_per_image: int = 100

    @classmethod
    def torchvision(cls) -> ModelConfig:
        """The config mirroring torchvision's ``fasterrcnn_resnet50_fpn`` (91 outputs)."""
        return cls(num_classes=90)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "model") -> ModelConfig:
        """Build from plain values (e.g. a YAML section); unknown keys raise naming the key.

        Lists are turned into tuples so the result is hashable and round-trips with
        ``to_dict``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), loadable by ``from_dict`` and by ``torch.load``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
