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


# Every norm on the basic-block ResNets; the deep (bottleneck) ones once, with frozen BN, to
# keep the suite fast.
BACKBONE_NORMS = [(b, n) for b in ("resnet18", "resnet34") for n in ("frozen_bn", "bn", "gn")] + [
    ("resnet50", "frozen_bn"),
    ("resnet101", "frozen_bn"),
]


@pytest.mark.parametrize(("backbone", "norm"), BACKBONE_NORMS)
def test_train_losses_and_eval_detections(backbone: str, norm: str) -> None:
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


def test_min_size_list_trains_multi_scale_and_tests_at_the_last_size() -> None:
    torch.manual_seed(0)
    model = fpn.build_detector(small_config(min_size=[64, 96]))
    assert model.transform.min_size == (64, 96)
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    batch, _ = model.transform(images)
    assert [min(size) for size in batch.image_sizes] == [96, 96]
    with torch.no_grad():
        outputs = model(images)
    for out, image in zip(outputs, images, strict=True):  # boxes back in input pixels
        h, w = image.shape[-2:]
        assert out["proposals"][:, 0::2].max() <= w + 1e-3 and out["proposals"][:, 1::2].max() <= h + 1e-3


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


@pytest.mark.parametrize(
    ("pyramid", "shared"),
    [
        ("fpn", False),
        ("bottom_up", True),
        ("top_down_no_lateral", True),
        ("p2_only", True),
        ("single_c4", True),
        ("single_c5", True),
    ],
)
def test_ablations_train_and_eval(pyramid: str, shared: bool) -> None:
    torch.manual_seed(0)
    cfg = small_config(pyramid=pyramid, shared_rpn_head=shared, norm="frozen_bn", trainable_stages=3)
    model = fpn.build_detector(cfg)
    rpn_levels = {"p2_only": (2,), "single_c4": (4,), "single_c5": (5,)}.get(pyramid, (2, 3, 4, 5, 6))
    assert model.rpn.levels == rpn_levels
    assert model.roi_heads.pooler.levels == (rpn_levels if len(rpn_levels) == 1 else (2, 3, 4, 5))
    if len(rpn_levels) == 1:  # all anchor sizes on the one level
        assert model.rpn.anchor_generator.num_anchors_per_location() == {rpn_levels[0]: 15}
    if pyramid == "single_c4":
        assert not hasattr(model.backbone, "layer4")  # res5 is never run
    if not shared:
        assert set(model.rpn.head.conv) == {"2", "3", "4", "5", "6"}
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2 and all(o["proposals"].shape[0] > 0 for o in outputs)


@pytest.mark.parametrize("norm", ["gn", "frozen_bn"])
def test_channels_last_puts_every_conv_weight_in_nhwc_and_loading_keeps_it(norm: str) -> None:
    model = fpn.build_detector(small_config(norm=norm))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 20
    nhwc = [w for w in convs if w.is_contiguous(memory_format=torch.channels_last)]
    assert len(nhwc) == len(convs), f"{len(convs) - len(nhwc)} of {len(convs)} conv weights are not NHWC"
    assert any(not w.is_contiguous() for w in convs), "a real layout change, not only 1x1 ambiguity"
    plain = fpn.build_detector(small_config(norm=norm, channels_last=False))
    assert not any(
        m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
        for m in plain.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    model.load_state_dict(plain.state_dict())
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    )


def test_channels_last_changes_only_rounding() -> None:
    torch.manual_seed(0)
    model = fpn.build_detector(small_config(channels_last=False)).eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        batch, _ = model.transform(images)
        nchw = model.neck(model.backbone(batch.tensor))
        nhwc = model.neck(model.backbone(batch.tensor.contiguous(memory_format=torch.channels_last)))
    for k in nchw:
        torch.testing.assert_close(nhwc[k], nchw[k], rtol=1e-4, atol=1e-4)


def test_autocast_losses_are_float32() -> None:
    torch.manual_seed(0)
    model = fpn.build_detector(small_config()).train()
    images, targets = images_and_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out, _) = model(images)
    assert out["boxes"].dtype == torch.float32 and out["proposals"].dtype == torch.float32


@pytest.mark.slow
def test_tiny_overfit_reduces_every_loss() -> None:
    """A few SGD steps on one image lower each of the four losses (measured with the same
    sampling seed before and after)."""
    torch.manual_seed(0)
    # Every anchor may become a proposal, so foreground RoIs besides the GT boxes exist from
    # the first step (else loss_box starts near 0 on the GT boxes alone and rises as the RPN
    # learns); objects fill most of the image for the same reason.
    cfg = small_config(
        min_size=128,
        max_size=128,
        anchor_sizes=(16, 32, 64, 128, 256),
        rpn_pre_nms_topk_train=1000,
        rpn_post_nms_topk_train=1000,
    )
    model = fpn.build_detector(cfg).train()
    image = torch.zeros(3, 128, 128)
    image[:, 4:124, 2:72] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    image[:, 10:110, 66:126] = torch.tensor([0.1, 0.3, 0.9])[:, None, None]
    target = {
        "boxes": torch.tensor([[2.0, 4.0, 72.0, 124.0], [66.0, 10.0, 126.0, 110.0]]),
        "labels": torch.tensor([1, 2]),
    }

    def losses() -> dict[str, float]:
        """Mean over three fixed sampling seeds, so before and after see the same draws."""
        total = dict.fromkeys(LOSS_NAMES, 0.0)
        with torch.no_grad():
            for seed in (101, 102, 103):
                torch.manual_seed(seed)
                for name, value in model([image], [target]).items():
                    total[name] += value.item() / 3
        return total

    before = losses()
    torch.manual_seed(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(20):
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = losses()
    for name in LOSS_NAMES:
        assert after[name] < before[name], (name, before[name], after[name])
