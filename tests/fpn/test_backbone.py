"""Bottom-up pathway: C2..C5 shapes and strides, norms, frozen stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fpn.backbone import ResNetBackbone


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))]
)
def test_c2_to_c5_shapes_and_strides(name: str, channels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth_name=name, norm="frozen_bn", trainable_stages=3).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 96))
    assert list(features) == [2, 3, 4, 5]
    for (level, c), ch in zip(features.items(), channels, strict=True):
        assert c.shape == (1, ch, 64 // 2**level, 96 // 2**level)
        assert backbone.out_channels[level] == ch


def test_last_level_four_skips_res5() -> None:
    backbone = ResNetBackbone(depth_name="resnet18", norm="gn", trainable_stages=5, last_level=4)
    assert not hasattr(backbone, "layer4")
    assert list(backbone(torch.rand(1, 3, 64, 64))) == [2, 3, 4]


@pytest.mark.parametrize(
    ("norm", "cls"), [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)]
)
def test_norm_layers(norm: str, cls: type) -> None:
    backbone = ResNetBackbone(depth_name="resnet18", norm=norm, trainable_stages=5)
    assert isinstance(backbone.bn1, cls) and isinstance(backbone.layer3[0].bn2, cls)


@pytest.mark.parametrize(
    ("stages", "trainable"), [(0, set()), (3, {"layer2", "layer3", "layer4"}), (5, None)]
)
def test_trainable_stages(stages: int, trainable: set[str] | None) -> None:
    backbone = ResNetBackbone(depth_name="resnet18", norm="gn", trainable_stages=stages)
    got = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    if trainable is None:  # everything, the stem's norm included
        assert got == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    else:
        assert got == trainable


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="resnet7"):
        ResNetBackbone(depth_name="resnet7", norm="gn", trainable_stages=3)
    with pytest.raises(ValueError, match="trainable_stages"):
        ResNetBackbone(depth_name="resnet18", norm="gn", trainable_stages=6)


def test_folded_frozen_bn_same_function_same_state_dict() -> None:
    torch.manual_seed(0)
    plain = ResNetBackbone(depth_name="resnet18", norm="frozen_bn", trainable_stages=3).eval()
    folded = ResNetBackbone(
        depth_name="resnet18", norm="frozen_bn", trainable_stages=3, fold_frozen_bn=True
    ).eval()
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, value in plain.state_dict().items():
        if name.endswith("running_var"):
            value = torch.rand(value.shape, generator=g) + 0.5
        elif name.endswith(("running_mean", "bias")):
            value = torch.randn(value.shape, generator=g) * 0.1
        state[name] = value
    plain.load_state_dict(state)
    folded.load_state_dict(state)  # same keys: strict loading works both ways
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert [p.requires_grad for p in folded.parameters()] == [p.requires_grad for p in plain.parameters()]
    x = torch.rand(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        expected, got = plain(x), folded(x)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-4)
