"""Anchors on the pyramid (Sec. 4.1 of the FPN paper).

"We define the anchors to have areas of {32^2, 64^2, 128^2, 256^2, 512^2} pixels on
{P2, P3, P4, P5, P6} respectively ... we also use anchors of multiple aspect ratios
{1:2, 1:1, 2:1} at each level. So in total there are 15 anchors over the pyramid."

Shapes (L: levels, A: anchors per location at a level, H_l x W_l: grid of level l):
    cell anchors of level l      (A, 4) centred at 0, rounded to whole pixels
    anchors of level l           (H_l * W_l * A, 4), location-major (row, column), then anchor
    anchors of the image batch   (sum_l H_l * W_l * A, 4), levels concatenated finest first

The same grid serves every image of a padded batch. Grids are cached by (grid size, stride,
device, dtype), so repeated forward passes at the same input size do no anchor work.
The stride of a level is ``padded image size // grid size`` per dimension, which is 2^k for
all levels up to P5 and may differ slightly for P6 when H/32 is odd (as in torchvision).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> Tensor:
    """Anchors centred at (0, 0): one per (aspect ratio, size), ratio-major -> (R*S, 4).

    ``aspect_ratio`` is height / width; the area is ``size**2`` for every ratio. Corners are
    rounded to whole pixels.
    """
    scales = torch.tensor(sizes, dtype=torch.float32)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float32)
    h_ratio = torch.sqrt(ratios)
    w_ratio = 1.0 / h_ratio
    widths = (w_ratio[:, None] * scales[None, :]).reshape(-1)  # (R*S,)
    heights = (h_ratio[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack((-widths, -heights, widths, heights), dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for each pyramid level used by the RPN.

    Args:
        sizes_per_level: ``{k: (anchor sides...)}``, e.g. ``{2: (32,), ..., 6: (512,)}`` for
            FPN, ``{4: (32, 64, 128, 256, 512)}`` for the single-scale C4 baseline.
        aspect_ratios: height/width ratios, the same at every level.
    """

    def __init__(
        self, *, sizes_per_level: dict[int, tuple[float, ...]], aspect_ratios: tuple[float, ...]
    ) -> None:
        super().__init__()
        self.levels = tuple(sorted(sizes_per_level))
        self.cells = {k: cell_anchors(sizes_per_level[k], aspect_ratios) for k in self.levels}
        self._cache: dict[tuple, Tensor] = {}

    def num_anchors_per_location(self) -> dict[int, int]:
        """{k: A_k}."""
        return {k: cell.shape[0] for k, cell in self.cells.items()}

    def grid_anchors(
        self, level: int, grid: tuple[int, int], stride: tuple[int, int], device, dtype
    ) -> Tensor:
        """Anchors of one level: (H*W*A, 4), cached."""
        key = (level, grid, stride, device, dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            cell = self.cells[level].to(device=device, dtype=dtype)  # (A, 4)
            shift_x = torch.arange(grid[1], device=device, dtype=torch.int64) * stride[1]
            shift_y = torch.arange(grid[0], device=device, dtype=torch.int64) * stride[0]
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4).to(dtype)  # (H*W, 1, 4)
            anchors = (shifts + cell[None]).reshape(-1, 4)  # (H*W*A, 4)
            if len(self._cache) > 64:  # many input sizes (multi-scale training): keep it bounded
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def forward(
        self, grid_sizes: dict[int, tuple[int, int]], image_size: tuple[int, int], device, dtype
    ) -> dict[int, Tensor]:
        """{k: (H_k, W_k)} and the padded batch size (H, W) -> {k: anchors (H_k*W_k*A_k, 4)}."""
        out = {}
        for level in self.levels:
            grid = tuple(grid_sizes[level])
            stride = (image_size[0] // grid[0], image_size[1] // grid[1])
            out[level] = self.grid_anchors(level, grid, stride, device, dtype)
        return out


def anchor_sizes_per_level(
    levels: tuple[int, ...], anchor_sizes: tuple[int, ...]
) -> dict[int, tuple[float, ...]]:
    """One size per level when the RPN sees several levels (FPN); all sizes on the one level
    of a single-level RPN (the single-scale baselines and ``p2_only``)."""
    if len(levels) == 1:
        return {levels[0]: tuple(float(s) for s in anchor_sizes)}
    if len(levels) != len(anchor_sizes):
        raise ValueError(f"{len(anchor_sizes)} anchor sizes for {len(levels)} RPN levels {levels}")
    return {k: (float(s),) for k, s in zip(levels, anchor_sizes, strict=True)}


__all__ = ["AnchorGenerator", "anchor_sizes_per_level", "cell_anchors"]
