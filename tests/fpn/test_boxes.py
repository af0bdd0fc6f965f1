"""Box math: encode/decode undo each other; clipping, areas, size filter, rescaling."""

from __future__ import annotations

import math

import pytest
import torch

from fpn.boxes import (
    DELTA_CLAMP,
    box_area,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nonempty_mask,
    scale_boxes,
)


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = torch.rand(n, 2, generator=g) * 200 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_undoes_encode(weights) -> None:
    boxes, references = random_boxes(50, 0), random_boxes(50, 1)
    deltas = encode_boxes(boxes, references, weights)
    assert deltas.shape == (50, 4)
    decoded = decode_boxes(deltas, references, weights)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], boxes, rtol=1e-5, atol=1e-3)


def test_encode_of_a_box_onto_itself_is_zero() -> None:
    boxes = random_boxes(10, 2)
    torch.testing.assert_close(encode_boxes(boxes, boxes, (10.0, 10.0, 5.0, 5.0)), torch.zeros(10, 4))


def test_hand_computed_deltas() -> None:
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    box = torch.tensor([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20), size 20 x 20
    deltas = encode_boxes(box, reference, (1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(deltas, torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))


def test_decode_per_class_and_clamp() -> None:
    references = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 100.0, 100.0]])  # two classes; second explodes
    out = decode_boxes(deltas, references, (1.0, 1.0, 1.0, 1.0))
    assert out.shape == (1, 2, 4)
    torch.testing.assert_close(out[0, 0], references[0])
    half = 0.5 * 16 * math.exp(DELTA_CLAMP)  # 500: the clamp keeps it finite
    torch.testing.assert_close(out[0, 1], torch.tensor([8 - half, 8 - half, 8 + half, 8 + half]))


def test_decode_empty() -> None:
    assert decode_boxes(torch.zeros(0, 8), torch.zeros(0, 4), (1.0, 1.0, 1.0, 1.0)).shape == (0, 2, 4)


def test_clip_area_nonempty_scale() -> None:
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 30.0], [10.0, 10.0, 10.5, 40.0]])
    clipped = clip_boxes(boxes, (20, 40))  # (height, width)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 40.0, 20.0], [10.0, 10.0, 10.5, 20.0]]))
    torch.testing.assert_close(box_area(clipped), torch.tensor([800.0, 5.0]))
    assert nonempty_mask(clipped, 1.0).tolist() == [True, False]
    scaled = scale_boxes(clipped, (20, 40), (40, 20))  # y doubles, x halves
    torch.testing.assert_close(scaled[0], torch.tensor([0.0, 0.0, 20.0, 40.0]))
