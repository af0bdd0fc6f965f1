"""ModelConfig: paper defaults, round trip through plain values, errors naming the field."""

from __future__ import annotations

import pytest
import torch

import fpn
from fpn.config import PYRAMIDS


def test_defaults_are_the_papers_resnet50_fpn() -> None:
    cfg = fpn.ModelConfig()
    assert (cfg.backbone, cfg.pyramid, cfg.fpn_channels) == ("resnet50", "fpn", 256)
    assert cfg.anchor_sizes == (32, 64, 128, 256, 512) and cfg.aspect_ratios == (0.5, 1.0, 2.0)
    assert (cfg.rpn_fg_iou, cfg.rpn_bg_iou) == (0.7, 0.3)
    assert (cfg.rpn_batch_per_image, cfg.rpn_positive_fraction) == (256, 0.5)
    assert (cfg.roi_batch_per_image, cfg.roi_positive_fraction, cfg.representation_size) == (512, 0.25, 1024)
    assert (cfg.canonical_level, cfg.canonical_scale, cfg.roi_output_size) == (4, 224, 7)
    assert fpn.ModelConfig.torchvision().num_classes == 90


def test_dict_round_trip_and_lists_become_tuples() -> None:
    cfg = fpn.ModelConfig(backbone="resnet18", anchor_sizes=[16, 32, 64, 128, 256], num_classes=3)
    assert cfg.anchor_sizes == (16, 32, 64, 128, 256)
    assert fpn.ModelConfig.from_dict(cfg.to_dict()) == cfg
    # to_dict holds plain values only: it survives a weights_only torch.load.
    assert isinstance(cfg.to_dict()["anchor_sizes"], list)


def test_min_size_list_is_multi_scale_and_round_trips() -> None:
    cfg = fpn.ModelConfig(min_size=[640, 672, 800], max_size=1333)
    assert cfg.min_size == cfg.min_sizes == (640, 672, 800) and cfg.test_min_size == 800
    assert cfg.to_dict()["min_size"] == [640, 672, 800]
    assert fpn.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.describe_sizes() == "800-1333 px (training: [640, 672, 800])"
    # A single int stays an int: the same plain values (and run names) as before lists.
    single = fpn.ModelConfig(min_size=800)
    assert single.to_dict()["min_size"] == 800 and single.min_sizes == (800,) and single.test_min_size == 800
    assert single.describe_sizes() == "800-1333 px"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="fpn_chanels"):
        fpn.ModelConfig.from_dict({"fpn_chanels": 64})


@pytest.mark.parametrize(
    ("values", "field", "detail"),
    [
        ({"backbone": "resnet7"}, "backbone", "unknown backbone 'resnet7'"),
        ({"norm": "layernorm"}, "norm", "choose from frozen_bn, bn, gn"),
        ({"pyramid": "fpn2"}, "pyramid", "unknown pyramid"),
        ({"fpn_channels": 0}, "fpn_channels", ">= 1"),
        ({"min_size": -800}, "min_size", ">= 1"),
        ({"min_size": 800, "max_size": 600}, "max_size", ">= min_size"),
        ({"min_size": []}, "min_size", "non-empty list"),
        ({"min_size": [640, 0]}, "min_size", ">= 1, got \\[640, 0\\]"),
        ({"min_size": [640, 800.0]}, "min_size", "integer"),
        ({"min_size": [640, True]}, "min_size", "integer"),
        ({"min_size": [640, 1400], "max_size": 1333}, "max_size", "1400.*got 1333"),
        ({"size_divisible": 20}, "size_divisible", "multiple of 32"),
        ({"trainable_stages": 6}, "trainable_stages", "<= 5"),
        ({"num_classes": 0}, "num_classes", ">= 1"),
        ({"anchor_sizes": (32, 64, 128)}, "anchor_sizes", "5 RPN levels"),
        ({"anchor_sizes": (32, -64, 128, 256, 512)}, "anchor_sizes", "positive"),
        ({"aspect_ratios": ()}, "aspect_ratios", "non-empty"),
        ({"rpn_fg_iou": 1.5}, "rpn_fg_iou", "<= 1.0"),
        ({"rpn_bg_iou": 0.8}, "rpn_bg_iou", "rpn_fg_iou"),
        ({"roi_positive_fraction": 0.0}, "roi_positive_fraction", "> 0.0"),
        ({"image_std": (0.2, 0.2)}, "image_std", "3 values"),
        ({"box_reg_weights": (10.0, 10.0, 5.0)}, "box_reg_weights", "4 values"),
        ({"representation_size": 1.5}, "representation_size", "integer"),
        ({"shared_rpn_head": "yes"}, "shared_rpn_head", "true or false"),
    ],
)
def test_bad_values_raise_naming_the_field(values: dict, field: str, detail: str) -> None:
    with pytest.raises(ValueError, match=f"ModelConfig.{field}: .*{detail}"):
        fpn.ModelConfig(**values)


@pytest.mark.parametrize("pyramid", ["p2_only", "single_c4", "single_c5"])
def test_single_level_pyramids_take_any_number_of_anchor_sizes(pyramid: str) -> None:
    cfg = fpn.ModelConfig(pyramid=pyramid, anchor_sizes=(32, 64, 128))
    assert cfg.anchor_sizes == (32, 64, 128)


def test_every_pyramid_builds() -> None:
    torch.manual_seed(0)
    for pyramid in PYRAMIDS:
        cfg = fpn.ModelConfig(backbone="resnet18", pyramid=pyramid, fpn_channels=16, representation_size=16)
        model = fpn.build_detector(cfg)
        assert isinstance(model, fpn.Detector)
