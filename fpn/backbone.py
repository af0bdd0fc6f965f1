"""Bottom-up pathway: a ResNet body giving C2..C5 (Sec. 3 of the FPN paper).

"The bottom-up pathway is the feed-forward computation of the backbone ConvNet ... we use
the output of the last residual block of each stage: {C2, C3, C4, C5} for conv2, conv3,
conv4 and conv5 outputs, [with] strides of {4, 8, 16, 32} pixels" (Sec. 3).

Shapes (N: images, H, W: padded input size):
    input  (N, 3, H, W)
    C2 (N, c2, H/4, W/4), C3 (N, c3, H/8, W/8), C4 (N, c4, H/16, W/16), C5 (N, c5, H/32, W/32)
with (c2..c5) = (64, 128, 256, 512) for ResNet-18/34 and (256, 512, 1024, 2048) for
ResNet-50/101. The ResNet building blocks come from torchvision.models; the stem, stages and
freezing are ours. Submodule names (conv1, bn1, layer1..layer4) follow torchvision's ResNet so
its state dicts map one to one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


def norm_layer_factory(norm: str) -> Callable[[int], nn.Module]:
    """The normalisation layer for ``norm`` in (frozen_bn, bn, gn).

    frozen_bn: BatchNorm with fixed statistics and affine terms (the paper fine-tunes from
    ImageNet with frozen BN); bn: ordinary BatchNorm; gn: GroupNorm with 32 groups
    (Wu & He, 2018), the choice for training from scratch with small batches.
    """
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {norm!r} (choose from frozen_bn, bn, gn)")


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BN whose affine map the preceding `ConvFrozenBN` applies; itself the identity.

    Keeps FrozenBatchNorm2d's buffers (weight, bias, running_mean, running_var), so state dicts
    are unchanged.
    """

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """(C,), (C,): the frozen BN is ``x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConvFrozenBN(nn.Conv2d):
    """A bias-free conv followed by a frozen BN, run as one conv with the BN folded in:
    ``conv(x, W * scale) + shift``. This saves two passes over the activation map per layer.
    Holds the same ``weight`` parameter as the conv it replaces; the BN stays in its own slot
    (as a `FoldedFrozenBatchNorm2d`) and is only referenced here, not registered twice.
    """

    def __init__(self, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> None:
        if conv.bias is not None:
            raise ValueError("ConvFrozenBN folds a frozen BN into a bias-free conv")
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=False,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        self._norm = (norm,)  # a tuple hides it from nn.Module's registry

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._norm[0].scale_and_shift()
        weight = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        return F.conv2d(x, weight, shift.to(x.dtype), self.stride, self.padding, self.dilation, self.groups)


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> None:
    conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
    folded = FoldedFrozenBatchNorm2d(norm.weight.shape[0], eps=norm.eps)
    folded.load_state_dict(norm.state_dict())
    setattr(parent, norm_name, folded)
    setattr(parent, conv_name, ConvFrozenBN(conv, folded))


def fold_frozen_batchnorm(resnet: nn.Module) -> None:
    """Fold every frozen BN of a torchvision ResNet into its conv, in place (same state dict)."""
    _fold_pair(resnet, "conv1", "bn1")
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    _fold_pair(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                _fold_pair(block.downsample, "0", "1")


class ResNetBackbone(nn.Module):
    """ResNet stem + stages res2..res5 returning ``{2: C2, 3: C3, 4: C4, 5: C5}``.

    Args:
        depth_name: resnet18 / resnet34 / resnet50 / resnet101.
        norm: frozen_bn / bn / gn.
        trainable_stages: how many of (res5, res4, res3, res2, stem) train, counted from the
            top (torchvision's ``trainable_backbone_layers``); 0 freezes the whole body.
        last_level: deepest stage computed (4 for the single-scale C4 baseline, which never
            runs res5); stages above it are not built.
        fold_frozen_bn: with ``norm="frozen_bn"``, apply each frozen BN inside its conv's
            weights (`ConvFrozenBN`): the same function up to float rounding, faster.
    """

    def __init__(
        self,
        *,
        depth_name: str,
        norm: str,
        trainable_stages: int,
        last_level: int = 5,
        fold_frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if depth_name not in STAGE_CHANNELS:
            raise ValueError(f"unknown backbone {depth_name!r} (choose from {tuple(STAGE_CHANNELS)})")
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {trainable_stages}")
        if last_level not in (2, 3, 4, 5):
            raise ValueError(f"last_level must be in 2..5, got {last_level}")
        resnet = getattr(torchvision.models, depth_name)(weights=None, norm_layer=norm_layer_factory(norm))
        if fold_frozen_bn and norm == "frozen_bn":
            fold_frozen_batchnorm(resnet)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.last_level = last_level
        self.stage_names = [f"layer{k - 1}" for k in range(2, last_level + 1)]  # C_k = layer{k-1}
        for name in self.stage_names:
            setattr(self, name, getattr(resnet, name))
        self.out_channels = {k: STAGE_CHANNELS[depth_name][k - 2] for k in range(2, last_level + 1)}
        self._freeze(trainable_stages)

    def _freeze(self, trainable_stages: int) -> None:
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_stages]
        if trainable_stages == 5:
            trainable.append("bn1")
        for name, param in self.named_parameters():
            if not any(name.startswith(prefix) for prefix in trainable):
                param.requires_grad_(False)

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        """(N, 3, H, W) normalised images -> {k: C_k} for k = 2..last_level."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (N, 64, H/4, W/4)
        features: dict[int, Tensor] = {}
        for level, name in enumerate(self.stage_names, start=2):
            x = getattr(self, name)(x)  # C_k: (N, c_k, H/2^k, W/2^k)
            features[level] = x
        return features
