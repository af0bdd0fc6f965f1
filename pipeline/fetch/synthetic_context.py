"""Synthetic data that needs the top-down pathway: small objects whose class only context tells.

``data.synthetic_kind: context``. The FPN paper's argument (Sec. 1 and 3) is that the
high-resolution maps of a bottom-up pyramid have "low-level features that harm their
representational capacity for object recognition", and that the top-down pathway brings the
semantics of the coarse levels down to them. The default shapes (`pipeline.fetch.synthetic`)
cannot show it: their classes differ in shape and colour that C2 already sees. Here they cannot:

=========  ===========  ===========================================================
category   COCO id      what tells it
=========  ===========  ===========================================================
pond       3            large region (120-190 px) with a circular outline
field      6            large region (120-190 px) with a square outline (rotated <= 25 deg)
boat       11           small disc (8-16 px) inside a pond
sheep      13           the same small disc inside a field
=========  ===========  ===========================================================

Boats and sheep are drawn from one distribution (size, colour, position inside the region),
and both kinds of region have the same interior (fill colour and noise drawn from one
distribution): only the outline (a 3 px band) differs, and every disc's box stays at least
``OUTLINE_MARGIN`` = 32 px inside the region's edge, 29 px from the band's inner edge. ResNet's C2 (stride 4) has a theoretical receptive field
of 43 px (conv1 7x7/2, max-pool 3x3/2, four 3x3 convs at stride 4), and a bottom-up P2 plus
the RPN's 3x3 conv 59 px, i.e. 29.5 px either side of a position: features at a disc's
pixels cannot see the outline that decides its class. C4 and C5 (and, through the top-down
pathway, FPN's P2) can. The large regions themselves are told apart by their outline shape at
any level. About 8% of the images are empty; ids and image sizes follow the default kind.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from pipeline.fetch.synthetic import Shape, background, boxes_near, make_shape, paint

CATEGORIES = (
    {"id": 3, "name": "pond", "supercategory": "region"},
    {"id": 6, "name": "field", "supercategory": "region"},
    {"id": 11, "name": "boat", "supercategory": "mark"},
    {"id": 13, "name": "sheep", "supercategory": "mark"},
)
MARK_OF = {"pond": "boat", "field": "sheep"}
REGION_SHAPE = {"pond": "circle", "field": "square"}
REGION_SIDE = (120.0, 190.0)  # px, the tight box's longer side; at most 3/4 of the shorter image side
MARK_SIDE = (8.0, 16.0)
OUTLINE_MARGIN = (
    32.0  # px between a mark's box and the outer edge of its region's outline (29 px to its inner edge)
)
OUTLINE_WIDTH = 3.0  # px
EMPTY_FRACTION = 0.08
MIN_CONTRAST = 40.0


def draw_image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[Shape]]:
    """One image (uint8 ``(H, W, 3)``) and its objects: regions first, then the marks in them."""
    canvas = background(rng, width, height)
    shapes: list[Shape] = []
    if rng.random() >= EMPTY_FRACTION:
        for region in _place_regions(rng, width, height):
            _paint_region(rng, canvas, region)
            shapes.append(region)
            for mark in _place_marks(rng, region):
                paint(canvas, mark, _contrasting(rng, canvas, mark))
                shapes.append(mark)
    canvas += rng.normal(0.0, 6.0, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), shapes


def _place_regions(rng: np.random.Generator, width: int, height: int) -> list[Shape]:
    """One or two non-touching regions inside the image, each a pond or a field."""
    high = min(REGION_SIDE[1], 0.75 * min(width, height))
    low = min(REGION_SIDE[0], high)
    regions: list[Shape] = []
    for _ in range(int(rng.integers(1, 3))):
        name = "pond" if rng.random() < 0.5 else "field"
        size = rng.uniform(low, high)
        for _attempt in range(30):
            outline = make_shape(rng, REGION_SHAPE[name], size, rng.uniform(0, width), rng.uniform(0, height))
            region = Shape(name, outline.polygon, outline.area)
            x1, y1, x2, y2 = region.box
            inside = x1 >= 1 and y1 >= 1 and x2 <= width - 1 and y2 <= height - 1
            if inside and not any(boxes_near(region.box, other.box, 4.0) for other in regions):
                regions.append(region)
                break
    return regions


def _paint_region(rng: np.random.Generator, canvas: np.ndarray, region: Shape) -> None:
    """Fill (one distribution for both kinds), then the outline as a band just inside the edge."""
    fill = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.75))) * 255
    edge = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.3))) * 255
    paint(canvas, region, edge)
    centre = region.polygon.mean(0)
    x1, y1, x2, y2 = region.box
    shrink = 1.0 - 2.0 * OUTLINE_WIDTH / max(x2 - x1, y2 - y1)
    paint(canvas, Shape(region.name, (region.polygon - centre) * shrink + centre, 0.0), fill)


def _place_marks(rng: np.random.Generator, region: Shape) -> list[Shape]:
    """0-4 discs whose boxes lie ``OUTLINE_MARGIN`` inside the region's outline, 2 px apart."""
    marks: list[Shape] = []
    x1, y1, x2, y2 = region.box
    for _ in range(int(rng.integers(0, 5))):
        size = math.exp(rng.uniform(math.log(MARK_SIDE[0]), math.log(MARK_SIDE[1])))
        for _attempt in range(30):
            disc = make_shape(rng, "circle", size, rng.uniform(x1, x2), rng.uniform(y1, y2))
            mark = Shape(MARK_OF[region.name], disc.polygon, disc.area)
            if inset(mark.box, region.polygon) >= OUTLINE_MARGIN and not any(
                boxes_near(mark.box, other.box, 2.0) for other in marks
            ):
                marks.append(mark)
                break
    return marks


def inset(box: tuple[float, float, float, float], polygon: np.ndarray) -> float:
    """How far the box ``(x1, y1, x2, y2)`` lies inside the convex ``polygon`` (V, 2): the smallest
    distance from a box corner to an edge's line, negative when a corner is outside."""
    x1, y1, x2, y2 = box
    corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    start, end = polygon, np.roll(polygon, -1, axis=0)
    edge = end - start  # (V, 2)
    normal = np.stack([-edge[:, 1], edge[:, 0]], 1) / np.linalg.norm(edge, axis=1, keepdims=True)
    centre = polygon.mean(0)
    normal *= np.sign(((centre - start) * normal).sum(1, keepdims=True))  # point inwards
    distances = ((corners[:, None, :] - start[None]) * normal[None]).sum(-1)  # (4, V)
    return float(distances.min())


def _contrasting(rng: np.random.Generator, canvas: np.ndarray, mark: Shape) -> np.ndarray:
    """A saturated colour (any hue: both classes alike) that stands out from the fill under the mark."""
    x1, y1, x2, y2 = (int(v) for v in mark.box)
    under = canvas[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).mean(0)
    for _ in range(8):
        colour = (
            np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))) * 255
        )
        if np.abs(colour - under).mean() >= MIN_CONTRAST:
            break
    return colour
