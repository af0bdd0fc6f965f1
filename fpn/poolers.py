"""RoI-to-pyramid-level assignment and RoIAlign (Sec. 4.2 of the FPN paper).

"We assign an RoI of width w and height h (on the input image to the network) to the level
P_k of our feature pyramid by:  k = floor(k0 + log2(sqrt(wh) / 224))   (1)
... 224 is the canonical ImageNet pre-training size, and k0 is the target level on which an
RoI with w x h = 224^2 should be mapped ... we set k0 to 4" (Sec. 4.2). Levels are clamped to
the pyramid used by the head (P2..P5). Each RoI is pooled to 7x7 by RoIAlign on its level
(on the CPU by `fpn.roi_align.roi_align_gather`, elsewhere by torchvision's kernel).

Shape shorthand: N images, R RoIs over the batch, C channels (d), S output size (7).
    features {k: (N, C, H/2^k, W/2^k)}, boxes N x (R_i, 4)  ->  (R, C, S, S)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from fpn.roi_align import roi_align_gather

# Added inside the floor of Eq. (1) so a box of exactly 224 * 2^j px lands on level k0 + j
# despite rounding in sqrt/log2.
LEVEL_EPS = 1e-6


def assign_levels(
    boxes: Tensor, *, canonical_level: int, canonical_scale: float, min_level: int, max_level: int
) -> Tensor:
    """Eq. (1) of the FPN paper for (R, 4) boxes in input pixels -> (R,) int64 levels."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    # Eq. (1): k = floor(k0 + log2(sqrt(wh) / 224)), clamped to the available levels.
    levels = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + LEVEL_EPS)
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign on the level of Eq. (1) of each box.

    Args:
        levels: pyramid levels the head pools from, e.g. (2, 3, 4, 5); one level pools every
            RoI from that map (p2_only and the single-scale baselines).
        output_size: S (7).
        sampling_ratio: sampling points per bin side in RoIAlign (2).
        canonical_level, canonical_scale: k0 = 4 and 224 of Eq. (1).
        aligned: RoIAlign's half-pixel offset (False matches torchvision's Faster R-CNN).
    The spatial scale of level k is 2^-k.
    """

    def __init__(
        self,
        *,
        levels: tuple[int, ...],
        output_size: int,
        sampling_ratio: int,
        canonical_level: int = 4,
        canonical_scale: float = 224.0,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.levels = tuple(sorted(levels))
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_level = canonical_level
        self.canonical_scale = canonical_scale
        self.aligned = aligned

    def _pool(self, feature: Tensor, rois: Tensor, level: int) -> Tensor:
        spatial_scale = math.ldexp(1.0, -level)
        if feature.device.type == "cpu" and feature.dtype == torch.float32 and self.sampling_ratio > 0:
            # The same numbers as torchvision's kernel, vectorised over channels (see fpn.roi_align).
            return roi_align_gather(
                feature,
                rois,
                output_size=self.output_size,
                spatial_scale=spatial_scale,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
        return roi_align(
            feature,
            rois,
            output_size=self.output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )

    def forward(self, features: dict[int, Tensor], boxes: list[Tensor]) -> Tensor:
        """Pool every box of every image -> (R, C, S, S), in the order of ``boxes``."""
        first = features[self.levels[0]]
        all_boxes = torch.cat(boxes)  # (R, 4)
        image_ids = torch.cat(
            [
                torch.full((b.shape[0], 1), i, dtype=first.dtype, device=first.device)
                for i, b in enumerate(boxes)
            ]
        )
        rois = torch.cat(
            [image_ids.to(all_boxes.dtype), all_boxes], dim=1
        )  # (R, 5): image index, x1, y1, x2, y2
        if not torch.is_autocast_enabled(first.device.type):
            rois = rois.to(first.dtype)  # under autocast roi_align runs in float32 and casts both itself
        if len(self.levels) == 1:
            return self._pool(first, rois, self.levels[0])
        levels = assign_levels(
            all_boxes,
            canonical_level=self.canonical_level,
            canonical_scale=self.canonical_scale,
            min_level=self.levels[0],
            max_level=self.levels[-1],
        )
        out: Tensor | None = None
        for level in self.levels:
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0:
                continue
            pooled = self._pool(features[level], rois[idx], level)  # (R_k, C, S, S)
            if out is None:
                out = pooled.new_zeros((rois.shape[0], *pooled.shape[1:]))
            # Into the rows of this level's RoIs. Indexed assignment (index_put_), not index_copy_:
            # autograd keeps only the indices for it, while index_copy_ saves the pooled tensor.
            out[idx] = pooled
        if out is None:  # no boxes at all
            out = first.new_zeros((0, first.shape[1], self.output_size, self.output_size))
        return out
