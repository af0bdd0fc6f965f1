"""The whole detector: train mode gives the four losses, eval mode the detections."""

from __future__ import annotations

import pytest
import torch

import fpn

LOSS_NAMES = {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}


def small_config(**overrides) -> fpn.ModelConfig:
    values = dict(
        backbone="resnet18",
        norm="gn",
        fpn_channels=32,
        representation_size=64,
        roi_batch_per_image=32,
        rpn_batch_per_image=64,
        rpn_pre_nms_topk_train=200,
        rpn_post_nms_topk_train=100,
        rpn_pre_nms_topk_test=200,
        rpn_post_nms_topk_test=50,
        min_size=96,
        max_size=160,
        num_classes=3,
    )
    values.update(overrides)
    return fpn.ModelConfig(**values)


def images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 90, 120, generator=g), torch.rand(3, 100, 80, generator=g)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0], [30.0, 5.0, 110.0, 40.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no objects
    ]
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_train_losses_and_eval_detections(backbone: str, norm: str) -> None:
    if backbone in ("resnet50", "resnet101") and norm != "frozen_bn":
        pytest.skip("deep backbones are checked once (frozen_bn) to keep the suite fast")
    torch.manual_seed(0)
    model = fpn.build_detector(small_config(backbone=backbone, norm=norm))
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.dtype == torch.float32
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, image in zip(outputs, images, strict=True):
        assert set(out) == {"boxes", "scores", "labels", "proposals", "proposal_scores"}
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["scores"].shape == (n,) and out["labels"].shape == (n,)
        assert out["labels"].dtype == torch.int64
        if n:
            assert out["labels"].min() >= 1 and out["labels"].max() <= 3
            h, w = image.shape[-2:]
            assert out["boxes"][:, 0::2].max() <= w + 1e-3 and out["boxes"][:, 1::2].max() <= h + 1e-3
        p = out["proposals"].shape[0]
        assert 0 < p <= 50 and out["proposal_scores"].shape == (p,)


def test_train_mode_without_targets_raises() -> None:
    model = fpn.build_detector(small_config())
    model.train()
    images, _ = images_and_targets()
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_bad_image_shape_raises() -> None:
    model = fpn.build_detector(small_config()).eval()
    with pytest.raises(ValueError, match="image 0"):
        model([torch.rand(1, 64, 64)])
