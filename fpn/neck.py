"""Top-down pathway and lateral connections (Sec. 3 and Fig. 3 of the FPN paper), plus the
ablation variants of Table 1 / Table 3.

"The top-down pathway hallucinates higher resolution features by upsampling spatially
coarser, but semantically stronger, feature maps from higher pyramid levels. These features
are then enhanced with features from the bottom-up pathway via lateral connections" (Sec. 3).

Shapes (N: images, d: ``out_channels``, C_k from the backbone with stride 2^k):
    in   {k: C_k (N, c_k, H/2^k, W/2^k)}      for k = 2..5
    out  {k: P_k (N, d,   H/2^k, W/2^k)}      for k in ``output_levels`` (P6: ceil(H/64))

Building blocks: a 1x1 lateral conv per level reduces C_k to d channels; the coarser map is
upsampled 2x by nearest neighbour and added; a 3x3 conv on each merged map makes P_k ("to
reduce the aliasing effect of upsampling"); "there are no non-linearities in these extra
layers". P6 is "a stride two subsampling of P5" (Sec. 4.1), used by the RPN only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # "Xavier" fill of Caffe2 / Detectron
    nn.init.zeros_(conv.bias)
    return conv


class FeaturePyramid(nn.Module):
    """The FPN neck and its ablations (Table 1 (d)-(f) of the paper).

    Args:
        in_channels: ``{k: channels of C_k}`` for k = 2..5.
        out_channels: d (256 in the paper).
        top_down: merge each level with the upsampled coarser map (False: ``bottom_up``
            ablation, each P_k comes from C_k alone).
        lateral: use 1x1 lateral connections from C_2..C_4 (False: ``top_down_no_lateral``
            ablation, only C5 enters through a 1x1 conv and is upsampled down the pyramid).
        output_levels: levels returned, finest first, e.g. (2, 3, 4, 5, 6) or (2,); level 6 is
            a stride-2 subsampling of P5 (max pool with kernel 1, as torchvision does).
    """

    def __init__(
        self,
        *,
        in_channels: dict[int, int],
        out_channels: int,
        top_down: bool = True,
        lateral: bool = True,
        output_levels: tuple[int, ...] = (2, 3, 4, 5, 6),
    ) -> None:
        super().__init__()
        if not (top_down or lateral):
            raise ValueError("a pyramid needs the top-down pathway, the lateral connections, or both")
        self.input_levels = tuple(sorted(in_channels))  # (2, 3, 4, 5)
        self.top_down = top_down
        self.lateral = lateral
        self.output_levels = tuple(output_levels)
        self.out_channels = out_channels
        lateral_levels = self.input_levels if lateral else self.input_levels[-1:]
        # lateral_convs[i] acts on C_{input_levels[i]}; output_convs[i] makes P_{input_levels[i]}.
        self.lateral_convs = nn.ModuleList(_conv(in_channels[k], out_channels, 1) for k in lateral_levels)
        conv_levels = [
            k for k in self.input_levels if k in self.output_levels or (k == 5 and 6 in output_levels)
        ]
        self.output_convs = nn.ModuleList(
            _conv(out_channels, out_channels, 3) if k in conv_levels else nn.Identity()
            for k in self.input_levels
        )

    def forward(self, features: dict[int, Tensor]) -> dict[int, Tensor]:
        """{k: C_k} -> {k: P_k} for k in ``output_levels``."""
        levels = self.input_levels
        merged: dict[int, Tensor] = {}
        top = self.lateral_convs[-1](features[levels[-1]])  # (N, d, H/32, W/32)
        merged[levels[-1]] = top
        for i in range(len(levels) - 2, -1, -1):
            level = levels[i]
            if self.lateral:
                lateral = self.lateral_convs[i](features[level])  # (N, d, H/2^k, W/2^k)
                if self.top_down:
                    # Fig. 3: upsample the coarser map 2x (nearest) and add the lateral map.
                    lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
                top = lateral
            else:
                size = features[level].shape[-2:]
                top = F.interpolate(top, size=size, mode="nearest")
            merged[level] = top
        outputs: dict[int, Tensor] = {}
        for i, level in enumerate(levels):
            if level in self.output_levels or (level == 5 and 6 in self.output_levels):
                outputs[level] = self.output_convs[i](merged[level])  # 3x3 conv against aliasing
        if 6 in self.output_levels:
            # Sec. 4.1: "P6 is simply a stride two subsampling of P5".
            outputs[6] = F.max_pool2d(outputs[5], kernel_size=1, stride=2)
        return {k: outputs[k] for k in self.output_levels}


class SingleScale(nn.Module):
    """The single-scale baselines (Table 1 (a)-(c), Table 2 (a)-(b)): one map C_k, k = 4 or 5,
    projected to d channels by a 1x1 conv so the RPN and RoI heads are the same as with FPN.

    in  {k: C_k (N, c_k, H/2^k, W/2^k)}  ->  out {k: (N, d, H/2^k, W/2^k)}
    """

    def __init__(self, *, in_channels: int, out_channels: int, level: int) -> None:
        super().__init__()
        self.level = level
        self.output_levels = (level,)
        self.out_channels = out_channels
        self.projection = _conv(in_channels, out_channels, 1)

    def forward(self, features: dict[int, Tensor]) -> dict[int, Tensor]:
        return {self.level: self.projection(features[self.level])}
