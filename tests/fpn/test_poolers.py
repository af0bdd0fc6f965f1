"""Eq. (1) level assignment on hand-computed boxes, and multi-level RoIAlign."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from fpn.poolers import MultiLevelRoIAlign, assign_levels


def square(side: float, x: float = 0.0) -> list[float]:
    return [x, 0.0, x + side, side]


@pytest.mark.parametrize(
    ("side", "level"),
    [(224, 4), (112, 3), (448, 5), (10, 2), (896, 5), (223, 3), (56, 2), (1000, 5), (300, 4), (150, 3)],
)
def test_eq1_levels(side: float, level: int) -> None:
    boxes = torch.tensor([square(side)])
    got = assign_levels(boxes, canonical_level=4, canonical_scale=224, min_level=2, max_level=5)
    assert got.tolist() == [level]


def test_eq1_non_square_uses_sqrt_of_area() -> None:
    boxes = torch.tensor([[0.0, 0.0, 448.0, 112.0]])  # sqrt(wh) = 224
    assert assign_levels(
        boxes, canonical_level=4, canonical_scale=224, min_level=2, max_level=5
    ).tolist() == [4]


def test_pooler_uses_each_boxs_level() -> None:
    g = torch.Generator().manual_seed(0)
    features = {k: torch.randn(2, 4, 512 // 2**k, 512 // 2**k, generator=g) for k in (2, 3, 4, 5)}
    pooler = MultiLevelRoIAlign(levels=(2, 3, 4, 5), output_size=7, sampling_ratio=2)
    boxes = [torch.tensor([square(448), square(20, 30)]), torch.tensor([square(112, 100)])]
    out = pooler(features, boxes)
    assert out.shape == (3, 4, 7, 7)
    for i, (image, box, level) in enumerate(
        [(0, square(448), 5), (0, square(20, 30), 2), (1, square(112, 100), 3)]
    ):
        rois = torch.tensor([[float(image), *box]])
        expected = roi_align(
            features[level], rois, output_size=7, spatial_scale=2.0**-level, sampling_ratio=2
        )
        torch.testing.assert_close(out[i], expected[0])


def test_single_level_pooler_and_empty_boxes() -> None:
    features = {4: torch.randn(1, 4, 8, 8)}
    pooler = MultiLevelRoIAlign(levels=(4,), output_size=7, sampling_ratio=2)
    assert pooler(features, [torch.tensor([square(500)])]).shape == (1, 4, 7, 7)
    multi = MultiLevelRoIAlign(levels=(2, 3), output_size=5, sampling_ratio=2)
    empty = multi({2: torch.randn(1, 4, 8, 8), 3: torch.randn(1, 4, 4, 4)}, [torch.zeros(0, 4)])
    assert empty.shape == (0, 4, 5, 5)
