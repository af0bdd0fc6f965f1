"""Box math as pure functions: the encode/decode pair, clipping, areas, small-box removal.

Conventions: boxes are ``[x1, y1, x2, y2]`` in absolute pixels (float), shape (B, 4).
Widths are ``x2 - x1`` (no "+1"). Deltas are ``(dx, dy, dw, dh)`` of the Faster R-CNN
parameterisation (Ren et al., 2015, Eq. (2)), each multiplied by a weight ``(wx, wy, ww, wh)``:

    dx = wx * (gx - ax) / aw        dw = ww * log(gw / aw)
    dy = wy * (gy - ay) / ah        dh = wh * log(gh / ah)

where ``(ax, ay, aw, ah)`` is the reference box (anchor or proposal) as centre and size.
`decode_boxes` undoes `encode_boxes`; ``dw``/``dh`` are clamped at ``log(1000 / 16)`` before
``exp`` so a wild prediction cannot overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale change decode accepts: a box may grow at most 1000/16 = 62.5x per side.
DELTA_CLAMP = math.log(1000.0 / 16)

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def encode_boxes(boxes: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Deltas that turn each reference box into its target box.

    boxes: (B, 4) targets, references: (B, 4) anchors or proposals -> (B, 4) deltas.
    Computed in float32 whatever the input dtype (AMP-safe).
    """
    boxes = boxes.float()
    references = references.float()
    wx, wy, ww, wh = weights
    ref_w = references[:, 2] - references[:, 0]
    ref_h = references[:, 3] - references[:, 1]
    ref_x = references[:, 0] + 0.5 * ref_w
    ref_y = references[:, 1] + 0.5 * ref_h
    box_w = boxes[:, 2] - boxes[:, 0]
    box_h = boxes[:, 3] - boxes[:, 1]
    box_x = boxes[:, 0] + 0.5 * box_w
    box_y = boxes[:, 1] + 0.5 * box_h
    return torch.stack(
        (
            wx * (box_x - ref_x) / ref_w,
            wy * (box_y - ref_y) / ref_h,
            ww * torch.log(box_w / ref_w),
            wh * torch.log(box_h / ref_h),
        ),
        dim=1,
    )


def decode_boxes(deltas: Tensor, references: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Apply deltas to reference boxes; the inverse of `encode_boxes`.

    deltas: (B, 4*C) (C boxes per reference, e.g. one per class), references: (B, 4)
    -> (B, C, 4) boxes. The result has the dtype of ``deltas``.
    """
    references = references.to(deltas.dtype)
    wx, wy, ww, wh = weights
    ref_w = references[:, 2] - references[:, 0]
    ref_h = references[:, 3] - references[:, 1]
    ref_x = references[:, 0] + 0.5 * ref_w
    ref_y = references[:, 1] + 0.5 * ref_h
    deltas = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)  # (B, C, 4)
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=DELTA_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=DELTA_CLAMP)
    ctr_x = dx * ref_w[:, None] + ref_x[:, None]
    ctr_y = dy * ref_h[:, None] + ref_y[:, None]
    half_w = 0.5 * (torch.exp(dw) * ref_w[:, None])
    half_h = 0.5 * (torch.exp(dh) * ref_h[:, None])
    return torch.stack((ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=-1)


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp (..., 4) boxes into an image of size ``(height, width)``."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(B, 4) -> (B,) areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nonempty_mask(boxes: Tensor, min_size: float) -> Tensor:
    """(B, 4) -> (B,) bool: both sides at least ``min_size`` pixels."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Map (B, 4) boxes from an image of ``from_size`` (h, w) to one of ``to_size`` (h, w).

    The ratio is computed per dimension in float32 (to_size / from_size).
    """
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32) / torch.tensor(from_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32) / torch.tensor(from_size[1], dtype=torch.float32)
    ratio = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(device=boxes.device, dtype=boxes.dtype)
    return boxes * ratio
