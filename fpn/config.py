"""Typed configuration of the FPN detector.

`ModelConfig` is a frozen dataclass holding every architectural and test-time setting of
the detector of "Feature Pyramid Networks for Object Detection" (Lin et al., CVPR 2017).
Conventions:

* ``num_classes`` counts foreground classes only. Labels are ``1..num_classes``; label 0
  is the background (torchvision's convention, so ``fasterrcnn_resnet50_fpn``'s 91 outputs
  are ``num_classes=90``).
* Pyramid levels are named by their index ``k`` (stride ``2**k``): P2..P6 for FPN.
* ``anchor_sizes`` gives one anchor side (sqrt of area, in input pixels) per pyramid level
  used by the RPN, finest first (5 for P2..P6); a single-level RPN (``p2_only``,
  ``single_c4``, ``single_c5``) puts all of them on its one level. ``aspect_ratios`` are
  height/width ratios.
* ``min_size`` is the shorter side images are resized to: an int, or a list of them for
  multi-scale training (torchvision's and Detectron2's convention): in training mode each
  image's shorter side is drawn uniformly from the list, in eval mode it is the last
  element (``ModelConfig.test_min_size``). ``max_size`` caps the longer side.

Invalid values raise ``ValueError`` naming the field, e.g.
``ModelConfig.backbone: unknown backbone 'resnet7' (choose from resnet18, ...)``.
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
# Pyramid levels k (stride 2**k) seen by the RPN and pooled by the RoI head, per pyramid.
RPN_LEVELS = {
    "fpn": (2, 3, 4, 5, 6),
    "bottom_up": (2, 3, 4, 5, 6),
    "top_down_no_lateral": (2, 3, 4, 5, 6),
    "p2_only": (2,),
    "single_c4": (4,),
    "single_c5": (5,),
}
ROI_LEVELS = {
    "fpn": (2, 3, 4, 5),
    "bottom_up": (2, 3, 4, 5),
    "top_down_no_lateral": (2, 3, 4, 5),
    "p2_only": (2,),
    "single_c4": (4,),
    "single_c5": (5,),
}


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
    min_size: int | tuple[int, ...] = 800  # a list: multi-scale training, tested at the last size
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
    # Execution: run the convolutions in NHWC memory format (faster with oneDNN on CPU and
    # tensor cores on GPU); results differ from NCHW by float rounding only.
    channels_last: bool = True
    # Execution: with norm "frozen_bn", fold each frozen BN into its conv's weights (saves two
    # passes over every activation map); same state dict, results differ by float rounding.
    fold_frozen_bn: bool = True

    def __post_init__(self) -> None:
        # Lists (e.g. from YAML or keyword arguments) become tuples: hashable, comparable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self._validate()

    def _error(self, name: str, message: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}: {message}")

    def _choice(self, name: str, choices: tuple[str, ...], what: str) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise self._error(name, f"unknown {what} {value!r} (choose from {', '.join(choices)})")

    def _number(
        self,
        name: str,
        *,
        integer: bool = False,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
    ) -> None:
        value = getattr(self, name)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self._error(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise self._error(name, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
        if high is not None and value > high:
            raise self._error(name, f"must be <= {high}, got {value!r}")

    def _positive_tuple(self, name: str, length: int | None = None) -> None:
        value = getattr(self, name)
        if not isinstance(value, tuple) or not value:
            raise self._error(name, f"expected a non-empty list of numbers, got {value!r}")
        if length is not None and len(value) != length:
            raise self._error(name, f"expected {length} values, got {len(value)}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise self._error(name, f"every value must be a positive number, got {value!r}")

    def _sizes(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, tuple):
            if not value:
                raise self._error(name, "expected an integer or a non-empty list of integers, got []")
            for v in value:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise self._error(name, f"every size must be an integer >= 1, got {list(value)}")
        else:
            self._number(name, integer=True, low=1)

    def _validate(self) -> None:
        self._choice("backbone", BACKBONES, "backbone")
        self._choice("norm", NORMS, "norm")
        self._choice("pyramid", PYRAMIDS, "pyramid")
        for name in ("shared_rpn_head", "channels_last", "fold_frozen_bn"):
            if not isinstance(getattr(self, name), bool):
                raise self._error(name, f"expected true or false, got {getattr(self, name)!r}")
        self._number("trainable_stages", integer=True, low=0, high=5)
        for name in (
            "fpn_channels",
            "max_size",
            "representation_size",
            "roi_output_size",
            "rpn_batch_per_image",
            "roi_batch_per_image",
            "rpn_pre_nms_topk_train",
            "rpn_pre_nms_topk_test",
            "rpn_post_nms_topk_train",
            "rpn_post_nms_topk_test",
            "num_classes",
            "detections_per_image",
            "size_divisible",
        ):
            self._number(name, integer=True, low=1)
        self._sizes("min_size")
        largest = max(self.min_sizes)
        if self.max_size < largest:
            of = "" if isinstance(self.min_size, int) else f", the largest of {list(self.min_size)}"
            raise self._error("max_size", f"must be >= min_size ({largest}{of}), got {self.max_size}")
        if self.size_divisible % 32:
            raise self._error(
                "size_divisible", f"must be a multiple of 32 (the stride of C5), got {self.size_divisible}"
            )
        self._positive_tuple("image_mean", 3)
        self._positive_tuple("image_std", 3)
        self._positive_tuple("anchor_sizes")
        self._positive_tuple("aspect_ratios")
        self._positive_tuple("box_reg_weights", 4)
        levels = RPN_LEVELS[self.pyramid]
        if len(levels) > 1 and len(self.anchor_sizes) != len(levels):
            raise self._error(
                "anchor_sizes",
                f"{len(self.anchor_sizes)} sizes given, but pyramid {self.pyramid!r} has {len(levels)} RPN levels "
                f"(P{levels[0]}..P{levels[-1]}): give one size per level",
            )
        for name in (
            "rpn_fg_iou",
            "rpn_bg_iou",
            "roi_fg_iou",
            "roi_bg_iou",
            "rpn_nms_iou",
            "box_nms_iou",
            "rpn_score_thresh",
            "box_score_thresh",
        ):
            self._number(name, low=0.0, high=1.0)
        for name in ("rpn_positive_fraction", "roi_positive_fraction"):
            self._number(name, low=0.0, high=1.0, low_open=True)
        if self.rpn_bg_iou > self.rpn_fg_iou:
            raise self._error(
                "rpn_bg_iou", f"must be <= rpn_fg_iou ({self.rpn_fg_iou}), got {self.rpn_bg_iou}"
            )
        if self.roi_bg_iou > self.roi_fg_iou:
            raise self._error(
                "roi_bg_iou", f"must be <= roi_fg_iou ({self.roi_fg_iou}), got {self.roi_bg_iou}"
            )
        self._number("canonical_level", integer=True, low=1)
        self._number("canonical_scale", low=0.0, low_open=True)
        self._number("roi_sampling_ratio", integer=True, low=0)

    @property
    def min_sizes(self) -> tuple[int, ...]:
        """The shorter sides training draws from, one per image (``(min_size,)`` for an int)."""
        return self.min_size if isinstance(self.min_size, tuple) else (self.min_size,)

    @property
    def test_min_size(self) -> int:
        """The shorter side in eval mode: ``min_size``, or its last element for a list."""
        return self.min_sizes[-1]

    def describe_sizes(self) -> str:
        """The resize for reports: ``"800-1333 px"`` (``min_size``-``max_size``), and for a list of
        ``min_size`` the test size and the training sizes: ``"800-1333 px (training: [640, 800])"``."""
        text = f"{self.test_min_size}-{self.max_size} px"
        return text if isinstance(self.min_size, int) else f"{text} (training: {list(self.min_size)})"

    @classmethod
    def torchvision(cls) -> ModelConfig:
        """The config mirroring torchvision's ``fasterrcnn_resnet50_fpn`` (91 outputs, frozen
        BN, 3 trainable stages; NCHW convolutions and unfolded BN, so the arithmetic is the same)."""
        return cls(num_classes=90, channels_last=False, fold_frozen_bn=False)

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
