"""Anchors: one size per level (areas 32^2..512^2 on P2..P6), three aspect ratios."""

from __future__ import annotations

import pytest
import torch

from fpn.anchors import AnchorGenerator, anchor_sizes_per_level, cell_anchors

LEVELS = (2, 3, 4, 5, 6)
SIZES = (32, 64, 128, 256, 512)


def test_cell_anchors_areas_and_ratios() -> None:
    cells = cell_anchors((32.0,), (0.5, 1.0, 2.0))
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    torch.testing.assert_close(w * h, torch.full((3,), 32.0**2), rtol=0.05, atol=0)
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0]), rtol=0.05, atol=0)
    torch.testing.assert_close(cells[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))  # ratio 1, centred at 0


def test_anchors_per_level_count_area_and_grid() -> None:
    generator = AnchorGenerator(
        sizes_per_level=anchor_sizes_per_level(LEVELS, SIZES), aspect_ratios=(0.5, 1.0, 2.0)
    )
    assert generator.num_anchors_per_location() == dict.fromkeys(LEVELS, 3)
    image = (128, 192)
    grids = {k: (-(-128 // 2**k), -(-192 // 2**k)) for k in LEVELS}
    anchors = generator(grids, image, torch.device("cpu"), torch.float32)
    for k, size in zip(LEVELS, SIZES, strict=True):
        a = anchors[k]
        assert a.shape == (grids[k][0] * grids[k][1] * 3, 4)
        area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        torch.testing.assert_close(area, torch.full_like(area, float(size**2)), rtol=0.05, atol=0)
    # Location-major layout: the second location of P2 is one stride (4 px) to the right.
    torch.testing.assert_close(anchors[2][3:6] - anchors[2][0:3], torch.tensor([[4.0, 0.0, 4.0, 0.0]] * 3))
    # Row-major: the first anchor of row 1 is 4 px down.
    row = grids[2][1] * 3
    torch.testing.assert_close(anchors[2][row] - anchors[2][0], torch.tensor([0.0, 4.0, 0.0, 4.0]))


def test_anchor_grid_is_cached() -> None:
    generator = AnchorGenerator(sizes_per_level={2: (32.0,)}, aspect_ratios=(1.0,))
    first = generator({2: (8, 8)}, (32, 32), torch.device("cpu"), torch.float32)[2]
    second = generator({2: (8, 8)}, (32, 32), torch.device("cpu"), torch.float32)[2]
    assert first is second


def test_single_level_takes_all_sizes() -> None:
    assert anchor_sizes_per_level((4,), SIZES) == {4: tuple(float(s) for s in SIZES)}
    generator = AnchorGenerator(
        sizes_per_level=anchor_sizes_per_level((4,), SIZES), aspect_ratios=(0.5, 1.0, 2.0)
    )
    assert generator.num_anchors_per_location() == {4: 15}


def test_size_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="3 anchor sizes for 5 RPN levels"):
        anchor_sizes_per_level(LEVELS, (32, 64, 128))
