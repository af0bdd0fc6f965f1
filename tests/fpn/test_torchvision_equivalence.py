"""Our detector computes what torchvision's fasterrcnn_resnet50_fpn computes at inference.

Both models get the same seeded random weights (ours loaded from torchvision's state dict),
the same small test sizes, and a lowered score threshold so there are detections to compare.
torchvision.models.detection is imported here only, never in fpn/.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

import fpn
from tests.detection_compare import assert_same_detections

MIN_SIZE, MAX_SIZE = 320, 512
SCORE_THRESH = 0.001
PRE_NMS, POST_NMS = 500, 300  # fewer RoIs than the defaults, for speed; the same in both models


def torchvision_reference() -> FasterRCNN:
    """fasterrcnn_resnet50_fpn's architecture (frozen BN, 3 trainable stages, 91 outputs),
    built from its public parts with random weights and randomised BN statistics."""
    torch.manual_seed(0)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = FasterRCNN(
        _resnet_fpn_extractor(body, 3),
        num_classes=91,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        box_score_thresh=SCORE_THRESH,
        rpn_pre_nms_top_n_test=PRE_NMS,
        rpn_post_nms_top_n_test=POST_NMS,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
        # Random BN statistics make the body's activations grow to ~1e3: scale the (linear)
        # pyramid's output convs so P2..P6 are O(1), and give the heads weights large enough
        # for objectness and class scores to spread and boxes to move.
        for conv in model.backbone.fpn.layer_blocks:
            conv[0].weight.mul_(1e-3)
        for param in model.rpn.head.parameters():
            param.normal_(0, 0.02, generator=g)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.01, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[FasterRCNN, fpn.Detector]:
    reference = torchvision_reference()
    cfg = dataclasses.replace(
        fpn.ModelConfig.torchvision(),
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        box_score_thresh=SCORE_THRESH,
        rpn_pre_nms_topk_test=PRE_NMS,
        rpn_post_nms_topk_test=POST_NMS,
    )
    ours = fpn.build_detector(cfg)
    report = fpn.load_torchvision_weights(ours, reference.state_dict())
    assert not report.unused and not report.missing
    return reference, ours.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.rand(3, 237, 301, generator=g), torch.rand(3, 410, 275, generator=g)]


def test_config_mirrors_torchvision_defaults() -> None:
    cfg = fpn.ModelConfig.torchvision()
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    assert tv.transform.min_size == (cfg.min_size,) and tv.transform.max_size == cfg.max_size
    assert tuple(tv.transform.image_mean) == cfg.image_mean and tuple(tv.transform.image_std) == cfg.image_std
    assert tv.roi_heads.box_predictor.cls_score.out_features == cfg.num_classes + 1
    assert tv.rpn._pre_nms_top_n == {
        "training": cfg.rpn_pre_nms_topk_train,
        "testing": cfg.rpn_pre_nms_topk_test,
    }
    assert tv.rpn._post_nms_top_n == {
        "training": cfg.rpn_post_nms_topk_train,
        "testing": cfg.rpn_post_nms_topk_test,
    }
    assert tv.rpn.nms_thresh == cfg.rpn_nms_iou and tv.rpn.score_thresh == cfg.rpn_score_thresh
    assert tv.roi_heads.score_thresh == cfg.box_score_thresh and tv.roi_heads.nms_thresh == cfg.box_nms_iou
    assert tv.roi_heads.detections_per_img == cfg.detections_per_image
    assert tv.roi_heads.box_coder.weights == cfg.box_reg_weights
    assert tv.rpn.anchor_generator.sizes == tuple((s,) for s in cfg.anchor_sizes)
    assert tv.rpn.anchor_generator.aspect_ratios[0] == cfg.aspect_ratios
    assert (cfg.backbone, cfg.norm, cfg.trainable_stages, cfg.pyramid) == ("resnet50", "frozen_bn", 3, "fpn")
    # Same parameter count as the frozen-BN (pretrained) architecture.
    ours = fpn.build_detector(cfg)
    reference = torchvision_reference()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.fixture(scope="module")
def outputs(models, images):
    """(torchvision's detections, torchvision's proposals in input pixels, our outputs)."""
    reference, ours = models
    with torch.no_grad():
        got = ours(images)
        batch, _ = reference.transform(images)
        features = reference.backbone(batch.tensors)
        proposals, _ = reference.rpn(batch, features)
        detections, _ = reference.roi_heads(features, proposals, batch.image_sizes)
        detections = reference.transform.postprocess(
            detections, batch.image_sizes, [im.shape[-2:] for im in images]
        )
    proposals = [
        props * torch.tensor([image.shape[2] / size[1], image.shape[1] / size[0]] * 2)
        for props, size, image in zip(proposals, batch.image_sizes, images, strict=True)
    ]
    return detections, proposals, got


def test_detections_match(outputs) -> None:
    expected, _, got = outputs
    for exp, out in zip(expected, got, strict=True):
        assert exp["boxes"].shape[0] > 10, "the test needs detections to compare"
        assert exp["labels"].unique().numel() > 1
        # Near-equal scores may come out in either order: compare as sets.
        assert_same_detections(
            out["boxes"].numpy(), out["scores"].numpy(), exp["boxes"].numpy(), exp["scores"].numpy(),
            out["labels"].numpy(), exp["labels"].numpy(), atol=1e-4, score_atol=1e-5,
        )  # fmt: skip


def test_proposals_match(outputs) -> None:
    _, expected, got = outputs
    for props, out in zip(expected, got, strict=True):
        assert props.shape == (POST_NMS, 4)
        torch.testing.assert_close(out["proposals"], props)


def test_backbone_from_plain_resnet_state_dict() -> None:
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(weights=None)
    model = fpn.build_detector(dataclasses.replace(fpn.ModelConfig(), backbone="resnet18", norm="bn"))
    report = fpn.load_torchvision_weights(model, resnet.state_dict())
    assert not report.unused and not report.missing
    for name, value in resnet.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_mismatched_state_dict_raises() -> None:
    model = fpn.build_detector(dataclasses.replace(fpn.ModelConfig(), backbone="resnet18", num_classes=3))
    with pytest.raises(ValueError, match="shape mismatches"):
        fpn.load_torchvision_weights(model, torchvision.models.resnet50(weights=None).state_dict())


def test_unshared_rpn_heads_and_single_c4_load() -> None:
    """torchvision's shared RPN head initialises each level's head; a plain ResNet fills a
    C4 backbone (res5 skipped); a detection state dict into another architecture reports."""
    torch.manual_seed(4)
    tv = FasterRCNN(
        _resnet_fpn_extractor(torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d), 3),
        num_classes=4,
    )
    cfg = fpn.ModelConfig(backbone="resnet18", num_classes=3, shared_rpn_head=False)
    model = fpn.build_detector(cfg)
    report = fpn.load_torchvision_weights(model, tv.state_dict())
    assert not report.unused and not report.missing
    for level in ("2", "6"):
        torch.testing.assert_close(model.rpn.head.conv[level].weight, tv.rpn.head.conv[0][0].weight)
        torch.testing.assert_close(model.rpn.head.bbox_pred[level].bias, tv.rpn.head.bbox_pred.bias)
    c4 = fpn.build_detector(dataclasses.replace(cfg, pyramid="single_c4", shared_rpn_head=True))
    report = fpn.load_torchvision_weights(c4, torchvision.models.resnet18(weights=None).state_dict())
    assert not report.missing
    with pytest.raises(ValueError, match="unused source keys"):
        fpn.load_torchvision_weights(c4, tv.state_dict())
    partial = fpn.load_torchvision_weights(c4, tv.state_dict(), strict=False)
    assert (
        any(k.startswith("backbone.fpn.") for k in partial.unused)
        and "backbone.conv1.weight" in partial.loaded
    )
