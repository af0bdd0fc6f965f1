"""Draw detections on an image (PIL ImageDraw): a box, the class name and the score per detection."""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(name: str) -> tuple[int, int, int]:
    """A bright colour fixed by the class name (the same in every picture and every run)."""
    hue = (zlib.crc32(name.encode()) % 360) / 360.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: Image.Image,
    boxes: np.ndarray,
    names: Sequence[str],
    scores: np.ndarray,
    *,
    score_thresh: float = 0.0,
) -> Image.Image:
    """A copy of ``image`` (as RGB) with each detection scoring >= ``score_thresh`` drawn.

    boxes: (N, 4) xyxy in ``image``'s pixels; names and scores: (N,). Lower scores are drawn first
    so the most confident boxes end on top.
    """
    canvas = image.convert("RGB")  # convert() returns a copy
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    for i in order:
        if scores[i] < score_thresh:
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        colour = class_colour(names[i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{names[i]} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        height = bottom - top
        label_y = y1 - height - 2 if y1 - height - 2 >= 0 else y1  # above the box, inside at the top edge
        draw.rectangle([x1, label_y, x1 + (right - left) + 4, label_y + height + 2], fill=colour)
        draw.text((x1 + 2, label_y), text, fill=(0, 0, 0), font=font)
    return canvas
