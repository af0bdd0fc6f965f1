"""Input handling inside the model: normalise, resize, batch with padding; and mapping the
outputs back to each input image's pixel coordinates.

"Following [Fast R-CNN], we resize the images such that their shorter side has 800 pixels"
(Sec. 5), with the longer side at most 1333 (Detectron's setting, also torchvision's). The
padded batch size is a multiple of 32 (the stride of C5), so that the pyramid levels align
exactly for the top-down additions. Multi-scale training (Detectron2's and torchvision's
convention) gives several shorter sides: in training mode each image draws one uniformly, in
eval mode the last one is used.

Shapes: images N x (3, H_i, W_i) float in 0..1 -> batch (N, 3, H, W) with H, W multiples of
``size_divisible``; ``image_sizes[i]`` = (h_i, w_i), the resized size before padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpn.boxes import scale_boxes


class ImageBatch(NamedTuple):
    """A padded batch and the size of each resized image inside it (before padding)."""

    tensor: Tensor  # (N, 3, H, W)
    image_sizes: list[tuple[int, int]]


class Transform(nn.Module):
    """Normalise with ImageNet mean/std, resize, pad to a multiple of ``size_divisible``.

    The resize factor is ``min(size / shorter side, max_size / longer side)``; bilinear
    interpolation computes the output size as floor(side * factor). Target boxes are scaled
    per dimension by the actual size ratio.

    ``min_size`` is one shorter side or several. With several, training mode draws ``size``
    uniformly for each image from torch's default generator (so a seeded run repeats its
    sizes) and eval mode takes the last; with one, nothing is drawn.
    """

    def __init__(
        self,
        *,
        min_size: int | Sequence[int],
        max_size: int,
        size_divisible: int,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.min_size: tuple[int, ...] = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not self.min_size:
            raise ValueError("Transform: min_size is empty")
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.register_buffer(
            "mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1), persistent=False
        )

    def shorter_side(self) -> int:
        """The target shorter side of the next image: drawn from ``min_size`` in training mode
        (one draw per call, none when there is one size), the last size in eval mode."""
        if self.training and len(self.min_size) > 1:
            return self.min_size[int(torch.randint(len(self.min_size), ()))]
        return self.min_size[-1]

    def resize(self, image: Tensor, size: int) -> Tensor:
        """(3, h, w) -> (3, h', w') with the shorter side ``size`` unless the longer side
        would exceed ``max_size``."""
        h, w = image.shape[-2:]
        factor = min(size / min(h, w), self.max_size / max(h, w))
        if math.floor(h * factor) == h and math.floor(w * factor) == w:
            return image  # already at size (e.g. preprocessed): bilinear would be the identity
        return F.interpolate(
            image[None],
            scale_factor=factor,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        if not images:
            raise ValueError("Transform: got an empty list of images")
        resized: list[Tensor] = []
        new_targets: list[dict[str, Tensor]] | None = [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"Transform: image {i} has shape {tuple(image.shape)}, expected (3, H, W)")
            normalised = (image - self.mean.to(image)) / self.std.to(image)
            out = self.resize(normalised, self.shorter_side())  # (3, h_i, w_i)
            resized.append(out)
            if targets is not None:
                target = dict(targets[i])
                target["boxes"] = scale_boxes(target["boxes"], tuple(image.shape[-2:]), tuple(out.shape[-2:]))
                new_targets.append(target)
        return self.batch(resized), new_targets

    def batch(self, images: list[Tensor]) -> ImageBatch:
        """Pad N x (3, h_i, w_i) with zeros to (N, 3, H, W), H and W multiples of ``size_divisible``."""
        d = self.size_divisible
        height = int(math.ceil(max(im.shape[-2] for im in images) / d) * d)
        width = int(math.ceil(max(im.shape[-1] for im in images) / d) * d)
        batch = images[0].new_zeros((len(images), 3, height, width))
        for slot, im in zip(batch, images, strict=True):
            slot[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return ImageBatch(batch, [(int(im.shape[-2]), int(im.shape[-1])) for im in images])

    @staticmethod
    def postprocess(
        results: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Map ``boxes`` and ``proposals`` from the resized frame to each input image's pixels."""
        out = []
        for result, size, original in zip(results, image_sizes, original_sizes, strict=True):
            result = dict(result)
            for key in ("boxes", "proposals"):
                if key in result:
                    result[key] = scale_boxes(result[key], size, original)
            out.append(result)
        return out
